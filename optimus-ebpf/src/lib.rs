#![no_std]
// Present so `optimus-user` can list this crate as a build-dependency (cargo then rebuilds
// the agent when the programs change); the programs live in `main.rs`.
