//! Fuzz target `carbon_json`: see `optimus::fuzzing::TARGETS` for what the input stands for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optimus::fuzzing::carbon_json(data));
