//! `push`, `pull` and `serve`: finished stages shared between stores.

use super::*;
use crate::store_path;
use clap::Args;
use deeprepair_pipeline::Store;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args)]
pub struct PushArgs {
    /// The store to copy into: a store file (created if missing; no other writer may hold
    /// it), or the URL of a `deeprepair serve --writable` (its token in
    /// $DEEPREPAIR_SERVE_TOKEN).
    pub(crate) dest: PathBuf,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

#[derive(Args)]
pub struct PullArgs {
    /// The store to copy from: a store file (opened read-only: it may belong to a running
    /// `run`), or the URL of a `deeprepair serve` (its token in $DEEPREPAIR_SERVE_TOKEN).
    pub(crate) src: PathBuf,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Also take stages pushed to it (`push URL`); the store is then opened as its writer.
    #[arg(long)]
    pub(crate) writable: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8390")]
    pub(crate) listen: std::net::SocketAddr,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    use deeprepair_workers::serve::SERVE_TOKEN_ENV;
    let path = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    if !path.exists() && !args.writable {
        anyhow::bail!("no store at {}", path.display());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let store = Arc::new(if args.writable {
        Store::open_writer(&path)?
    } else {
        Store::open_read_only(&path)?
    });
    let token = match std::env::var(SERVE_TOKEN_ENV) {
        Ok(token) => token,
        Err(_) => {
            let token = deeprepair_workers::new_secret()?;
            println!("token (give it to `pull` in ${SERVE_TOKEN_ENV}): {token}");
            token
        }
    };
    let server = deeprepair_workers::serve::serve(store, args.listen, token, args.writable)?;
    println!(
        "serving {} {} at http://{}",
        path.display(),
        if args.writable {
            "read-write"
        } else {
            "read-only"
        },
        server.addr
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    server.wait();
    Ok(ExitCode::SUCCESS)
}

/// Copies `from`'s finished stages into `to` and says what happened.
pub(crate) fn import(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<ExitCode> {
    if !from.exists() {
        anyhow::bail!("no store at {}", from.display());
    }
    if from.canonicalize().ok() == to.canonicalize().ok() {
        anyhow::bail!("{} is the same store as {}", from.display(), to.display());
    }
    let source = Store::open_read_only(from)?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let dest = Store::open_writer(to)?;
    let report = dest.import_actions(&source)?;
    print_import(
        &report,
        &from.display().to_string(),
        &to.display().to_string(),
    );
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let here = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    let dest = args.dest.to_string_lossy();
    if !(dest.starts_with("http://") || dest.starts_with("https://")) {
        return import(&here, &args.dest);
    }
    use deeprepair_workers::serve::SERVE_TOKEN_ENV;
    let token = std::env::var(SERVE_TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!("${SERVE_TOKEN_ENV} is not set (the token `serve` printed)")
    })?;
    if !here.exists() {
        anyhow::bail!("no store at {}", here.display());
    }
    let source = Store::open_read_only(&here)?;
    let report = deeprepair_workers::serve::push_to(&source, &dest, &token)?;
    print_import(&report, &here.display().to_string(), &dest);
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let here = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    let src = args.src.to_string_lossy();
    if !(src.starts_with("http://") || src.starts_with("https://")) {
        return import(&args.src, &here);
    }
    use deeprepair_workers::serve::SERVE_TOKEN_ENV;
    let token = std::env::var(SERVE_TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!("${SERVE_TOKEN_ENV} is not set (the token `serve` printed)")
    })?;
    if let Some(parent) = here.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let dest = Store::open_writer(&here)?;
    let report = deeprepair_workers::serve::pull_from(&src, &token, &dest)?;
    print_import(&report, &src, &here.display().to_string());
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) fn print_import(
    report: &deeprepair_pipeline::store::ImportReport,
    from: &str,
    to: &str,
) {
    println!(
        "copied {} stages ({:.1} MiB of outputs, digests verified) from {from} to {to}; {} already there",
        report.copied,
        report.bytes as f64 / (1 << 20) as f64,
        report.already_present
    );
    for skipped in &report.skipped {
        println!("  not copied: {skipped}");
    }
}
