//! The process-wide fatal state: once an invariant breaks (a panic on any
//! thread, a dead engine actor), the process is not ready from that very
//! moment and stops with a non-zero exit.
//!
//! Readiness reads [`reason`] synchronously, so no request can see a ready
//! server after the panic hook ran, not even before the server's main task
//! has woken up to begin the stop.

use std::sync::OnceLock;

use tokio::sync::watch;

fn channel() -> &'static watch::Sender<Option<String>> {
    static FATAL: OnceLock<watch::Sender<Option<String>>> = OnceLock::new();
    FATAL.get_or_init(|| watch::Sender::new(None))
}

/// Reports a fatal error: the server is not ready from now on and exits
/// non-zero. The first reason is kept.
pub fn report(why: String) {
    tracing::error!(reason = %why, "fatal: stopping the server");
    channel().send_if_modified(|fatal| {
        if fatal.is_some() {
            return false;
        }
        *fatal = Some(why);
        true
    });
}

/// Why the process is stopping, once something fatal happened.
pub fn reason() -> Option<String> {
    channel().borrow().clone()
}

/// Resolves with the reason once something fatal happened.
pub async fn wait() -> String {
    let mut rx = channel().subscribe();
    let why = rx
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|f| f.clone());
    match why {
        Some(why) => why,
        None => std::future::pending().await,
    }
}

/// A panic anywhere is an invariant that broke: after the usual report,
/// the process is told to stop. Installed once per process.
pub fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let report_panic = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report_panic(info);
            let thread = std::thread::current();
            report(format!(
                "panic on thread {}: {info}",
                thread.name().unwrap_or("unnamed")
            ));
        }));
    });
}
