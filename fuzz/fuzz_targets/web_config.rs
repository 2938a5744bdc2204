//! Fuzz target `web_config`: see `optimus::fuzzing::TARGETS` for what the input stands for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optimus::fuzzing::web_config(data));
