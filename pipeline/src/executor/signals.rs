//! Ctrl-C, SIGTERM and SIGHUP during a run.

use crate::dispatch::Dispatcher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Watches for stop signals: the first sets `cancel` (no new stages; running ones stop at
/// their next checkpoint), the second abandons the dispatcher's jobs and exits at once.
pub(super) fn watch(
    cancel: Arc<AtomicBool>,
    dispatcher: Option<Arc<dyn Dispatcher>>,
) -> std::io::Result<()> {
    let mut signals = Signals::new()?;
    tokio::spawn(async move {
        while let Some(name) = signals.next().await {
            if cancel.swap(true, Ordering::SeqCst) {
                eprintln!(
                    "{name} again: exiting now (committed stages are kept; jobs elsewhere are cancelled)"
                );
                if let Some(d) = &dispatcher {
                    d.abandon();
                }
                std::process::exit(130);
            }
            eprintln!("{name}: no new stages; running ones stop at their next checkpoint (Ctrl-C again to exit now)");
        }
    });
    Ok(())
}

/// The signals that stop a run: Ctrl-C (SIGINT), SIGTERM (`kill`, a batch system's time
/// limit) and SIGHUP (the terminal went away). All mean the same: stop launching, let running
/// stages stop at a safe point and cancel their jobs; the second one exits at once.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal's name; `None` when signals can no longer be received.
    async fn next(&mut self) -> Option<&'static str> {
        #[cfg(unix)]
        {
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.ok().map(|_| "interrupt"),
                s = self.term.recv() => s.map(|_| "SIGTERM"),
                s = self.hup.recv() => s.map(|_| "SIGHUP"),
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await.ok().map(|_| "interrupt")
    }
}
