//! Fuzz target `proc_meminfo`: see `optimus::fuzzing::TARGETS` for what the input stands for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optimus::fuzzing::proc_meminfo(data));
