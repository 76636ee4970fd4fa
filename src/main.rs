use clap::Parser;

/// Exit code for every error, as clap uses for usage errors.
const EXIT_ERROR: i32 = 2;

/// mimalloc, told never to hand freed pages back to the OS: every large tensor glibc maps fresh
/// costs page faults and kernel zeroing on first touch (6% of a CPU VAE decode in
/// docs/performance.md); reused pages cost nothing. Peak RSS is unchanged.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 2.x's `mi_option_e` (libmimalloc-sys 0.1.49 names no
/// constant for it); -1 = never purge.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // SAFETY: sets a process-wide allocator option; no allocation depends on it yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = sdfix::cli::Cli::parse();
    if let Err(err) = sdfix::cli::run(cli) {
        // A reader that stopped early (`sdfix stats DIR | head -1`) is not a failure.
        if is_broken_pipe(&err) {
            std::process::exit(0);
        }
        eprintln!("error: {err:#}");
        std::process::exit(EXIT_ERROR);
    }
}

/// Whether writing to a closed stdout caused `err`.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
