use inventory::config::Cli;

/// mimalloc instead of glibc malloc: the service makes many small, short-lived allocations on
/// every request (measured in bench/results/2026-11-29-mimalloc.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::from_env_and_args();
    let telemetry = inventory::telemetry::init(cli.log_format);
    for warning in &cli.deprecated {
        tracing::warn!("{warning}");
    }
    let code = match inventory::startup::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("inventory: {err}");
            std::process::ExitCode::FAILURE
        }
    };
    // After the graceful stop: the spans of the last requests are still to be sent.
    telemetry.shutdown().await;
    code
}
