//! Command line: parse, then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wavelog_worker::config::LogFormat;
use wavelog_worker::{duration, token, Config};

#[derive(Parser)]
#[command(
    name = "wavelog-worker",
    version,
    about = "Real-time push gateway for Wavelog"
)]
struct Cli {
    /// Path of the TOML config file.
    #[arg(long, short, global = true, default_value = "worker.toml")]
    config: PathBuf,
    /// Validate the config, print the effective values (secret redacted) and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a browser token signed with the configured secret.
    Token {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 0)]
        user_id: i64,
        /// Lifetime, e.g. 24h, 90m.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Print a fresh random secret (64 hex characters).
    GenSecret,
    /// Exit 0 if the worker configured by --config answers GET /healthz (for Docker HEALTHCHECK).
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::GenSecret) => gen_secret(),
        Some(Command::Healthcheck) => healthcheck(&cli.config),
        Some(Command::Token {
            topic,
            user_id,
            ttl,
        }) => make_token(&cli.config, &topic, user_id, &ttl),
        None if cli.check_config => check_config(&cli.config),
        None => serve(&cli.config),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path, &|k| std::env::var(k).ok()).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn serve(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wavelog_worker::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Prints the effective configuration as TOML (secret redacted), so an operator sees what the
/// file plus environment amount to.
fn check_config(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("# effective configuration of {} (valid)", path.display());
    print!("{}", config.to_toml_redacted());
    ExitCode::SUCCESS
}

fn gen_secret() -> ExitCode {
    let mut bytes = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut bytes) {
        eprintln!("no randomness available: {e}");
        return ExitCode::FAILURE;
    }
    println!("{}", token::hex_encode(&bytes));
    ExitCode::SUCCESS
}

fn make_token(path: &std::path::Path, topic: &str, user_id: i64, ttl: &str) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ttl = match duration::parse(ttl) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            eprintln!("--ttl: expected a positive duration such as 24h or 90m, got {ttl:?}");
            return ExitCode::from(2);
        }
    };
    let now = wavelog_worker::time::unix_now();
    let claims = token::Claims {
        user_id,
        topic: topic.to_string(),
        expires: now + ttl.as_secs() as i64,
    };
    println!("{}", token::sign(config.worker_secret.expose(), &claims));
    ExitCode::SUCCESS
}

/// Asks the public listener for `/healthz` with a plain blocking HTTP/1.0 request, so the
/// container image needs no curl.
fn healthcheck(path: &std::path::Path) -> ExitCode {
    use std::io::{Read, Write};
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], config.ws_port));
    let timeout = std::time::Duration::from_secs(3);
    let answer = std::net::TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    });
    match answer {
        Ok(text) if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") => {
            ExitCode::SUCCESS
        }
        Ok(text) => {
            eprintln!("unhealthy: {}", text.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
