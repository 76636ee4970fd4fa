use clap::Parser;

/// Exit code for every error, as clap uses for usage errors.
const EXIT_ERROR: i32 = 2;

fn main() {
    let cli = sdfix::cli::Cli::parse();
    if let Err(err) = sdfix::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(EXIT_ERROR);
    }
}
