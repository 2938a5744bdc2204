//! Re-run when bpf-linker changes, so a new linker relinks the programs (aya-template's way).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
