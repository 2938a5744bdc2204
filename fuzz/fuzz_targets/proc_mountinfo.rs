//! Fuzz target `proc_mountinfo`: see `optimus::fuzzing::TARGETS` for what the input stands for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optimus::fuzzing::proc_mountinfo(data));
