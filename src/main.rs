use clap::Parser;

/// Exit code for every error, as clap uses for usage errors.
const EXIT_ERROR: i32 = 2;

/// mimalloc for small blocks, our own arena for blocks over 512 KiB; freed memory is kept for
/// reuse while a phase computes and handed back to the OS between phases
/// ([`sdfix::kernels::host_memory`]).
#[global_allocator]
static ALLOCATOR: sdfix::kernels::host_memory::HostAllocator = sdfix::kernels::host_memory::HostAllocator;

fn main() {
    sdfix::kernels::host_memory::keep_freed_memory();
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
