use clap::Parser;
use inventory::config::Cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    inventory::telemetry::init(cli.log_format);
    match inventory::startup::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("inventory: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
