//! Builds the kernel tracker (`tracker-ebpf`) for the BPF target; the daemon
//! embeds the object with `include_bytes_aligned!`.

fn main() -> aya_build::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tracker-ebpf");
    // The eBPF crate needs `core_intrinsics` and `-Z build-std=core`; this lets
    // the stable toolchain build it (the only toolchain a fresh machine has).
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    // Build with the toolchain that builds the daemon.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracker-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
