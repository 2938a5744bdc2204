//! Fuzz target `qemu_cmdline`: see `optimus::fuzzing::TARGETS` for what the input stands for.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optimus::fuzzing::qemu_cmdline(data));
