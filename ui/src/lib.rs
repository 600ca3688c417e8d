//! `deeprepair ui`: a read-only web UI over a store. Server-rendered HTML (maud, escaped by
//! construction), no script beyond a meta refresh, everything in the binary.
//!
//! Invariants:
//! - **Read-only**: the store is opened with [`Store::open_read_only`], which never writes
//!   (not even crash recovery); no handler has a write path. A running writer's commits show
//!   on the next request, and pages of a running run refresh themselves.
//! - **Loopback unless a token guards it**: a non-loopback address gets a random token (from
//!   the OS RNG, printed once at start) that every request must carry as `?token=`, the
//!   `deeprepair_ui_token` cookie (set on the first good `?token=`) or `Authorization: Bearer`;
//!   it is compared in constant time. Without a token only requests whose `Host` is loopback
//!   are answered (no DNS rebinding). Every answer forbids script and framing (CSP).
//! - **Bad input is an error page**, never a panic: unknown runs, stages, digests, pages and
//!   undecodable artifacts answer 400/404 with the reason.

mod dag;
mod pages;
mod viewers;

pub use dag::{layout, Layout};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use deeprepair_pipeline::{Store, StoreError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The cookie a browser keeps the token in after its first `?token=` request.
pub const TOKEN_COOKIE: &str = "deeprepair_ui_token";

/// How `deeprepair ui` was asked to serve.
pub struct Options {
    pub store: PathBuf,
    pub listen: SocketAddr,
}

/// A store the UI reads, a token if the address is not loopback, and caches of decoded
/// artifacts (content-addressed, so never stale).
pub struct App {
    pub(crate) store: Store,
    pub(crate) token: Option<String>,
    pub(crate) cache: viewers::Cache,
}

/// Why a page could not be shown; the status it answers with.
#[derive(Debug)]
pub(crate) enum UiError {
    NotFound(String),
    BadRequest(String),
    Internal(String),
}

impl From<StoreError> for UiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => UiError::NotFound(format!("{what} not found")),
            other => UiError::Internal(other.to_string()),
        }
    }
}

impl From<anyhow::Error> for UiError {
    fn from(e: anyhow::Error) -> Self {
        UiError::Internal(format!("{e:#}"))
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            UiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            UiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            UiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        let body = pages::layout(
            &format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
            None,
            maud::html! { p class="error" { (message) } },
        );
        (status, Html(body.into_string())).into_response()
    }
}

pub(crate) type UiResult<T> = Result<T, UiError>;

/// A fresh 256-bit token from the operating system's RNG, as hex.
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("OS random source: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether a request presents `token` (query, cookie or bearer header), in constant time.
fn presents_token(token: &str, query: Option<&str>, headers: &HeaderMap) -> (bool, bool) {
    let matches = |given: &str| -> bool { bool::from(given.as_bytes().ct_eq(token.as_bytes())) };
    let from_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.strip_prefix("token="))
        .any(|v| {
            let decoded = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            matches(&decoded)
        });
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
        .any(matches);
    let from_bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| matches(t.trim()));
    (from_query || from_cookie || from_bearer, from_query)
}

/// Whether a `Host` header names this machine's loopback (`localhost`, `127.0.0.1`, `[::1]`,
/// with or without a port): what a browser sends to a loopback UI. Anything else, on a UI
/// without a token, is a page elsewhere reaching in through DNS rebinding.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What every answer carries: no script, no framing, images only from here or inline.
const CSP: &str = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; \
                   form-action 'self'; frame-ancestors 'none'";

async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let mut set_cookie = None;
    match app.token.as_deref() {
        None => {
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            if !loopback_host(host) {
                return (
                    StatusCode::FORBIDDEN,
                    "this deeprepair ui answers only requests to localhost (Host header)",
                )
                    .into_response();
            }
        }
        Some(token) => {
            let (ok, via_query) = presents_token(token, request.uri().query(), request.headers());
            if !ok {
                return (
                    StatusCode::UNAUTHORIZED,
                    "this deeprepair ui listens beyond loopback: add ?token=<the token it printed \
                     at start>",
                )
                    .into_response();
            }
            if via_query {
                set_cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")
                    .parse()
                    .ok();
            }
        }
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Some(cookie) = set_cookie {
        headers.insert(header::SET_COOKIE, cookie);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    response
}

/// The routes, over an open store (tests and [`serve`] share it).
pub fn router(store: Store, token: Option<String>) -> Router {
    let app = Arc::new(App {
        store,
        token,
        cache: viewers::Cache::default(),
    });
    Router::new()
        .route("/", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/stage", get(pages::stage))
        .route("/runs/{id}/compare", get(pages::compare))
        .route("/artifacts/{digest}", get(viewers::artifact))
        .route("/artifacts/{digest}/download", get(viewers::download))
        .route(
            "/artifacts/{digest}/files/{*name}",
            get(viewers::report_file),
        )
        .fallback(|| async { UiError::NotFound("no such page".into()) })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Why `ui` could not start: a usage problem (exit 2) or something else.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Serves `store` on `listen` from a thread of its own (its own small tokio runtime) until the
/// process ends; returns the bound address (`listen` may ask for port 0). For tests and
/// embedding; `deeprepair ui` uses [`serve`].
pub fn spawn(
    store: Store,
    token: Option<String>,
    listen: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let app = router(store, token);
    let runtime = runtime()?;
    std::thread::Builder::new()
        .name("deeprepair-ui".into())
        .spawn(move || {
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app).await
            });
            if let Err(e) = served {
                tracing::error!("ui server: {e}");
            }
        })?;
    Ok(addr)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("deeprepair-ui")
        .enable_all()
        .build()
}

/// Opens the store read-only, binds, prints the address (and the token, if any) on stdout,
/// then serves until Ctrl-C.
pub fn serve(options: Options) -> Result<(), StartError> {
    let store = Store::open_read_only(&options.store).map_err(|e| match e {
        StoreError::Missing { .. } => StartError::Usage(e.to_string()),
        other => StartError::Other(other.into()),
    })?;
    let token = if options.listen.ip().is_loopback() {
        None
    } else {
        Some(new_token()?)
    };
    let listener = std::net::TcpListener::bind(options.listen)
        .map_err(|e| StartError::Usage(format!("cannot listen on {}: {e}", options.listen)))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| StartError::Other(e.into()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(e.into()))?;
    let shown = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        match &token {
            None => writeln!(
                out,
                "deeprepair ui: http://{shown}/ (store {})",
                options.store.display()
            ),
            Some(t) => writeln!(
                out,
                "deeprepair ui: http://{shown}/?token={t} (listening on {addr}; store {}; the \
                 token is shown only now)",
                options.store.display()
            ),
        }
        .and_then(|()| out.flush())
        .map_err(|e| StartError::Other(e.into()))?;
    }
    let app = router(store, token);
    runtime()
        .map_err(|e| StartError::Other(e.into()))?
        .block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
        })
        .map_err(|e| StartError::Other(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_accepted_from_query_cookie_or_bearer_and_nothing_else() {
        let t = new_token().unwrap();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token().unwrap());
        let none = HeaderMap::new();
        assert_eq!(
            presents_token(&t, Some(&format!("page=2&token={t}")), &none),
            (true, true)
        );
        assert!(!presents_token(&t, Some("token=abc"), &none).0);
        assert!(!presents_token(&t, Some(&format!("token={}", &t[..63])), &none).0);
        assert!(!presents_token(&t, None, &none).0);
        let mut cookie = HeaderMap::new();
        cookie.insert(
            header::COOKIE,
            format!("a=b; {TOKEN_COOKIE}={t}").parse().unwrap(),
        );
        assert_eq!(presents_token(&t, None, &cookie), (true, false));
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        assert!(presents_token(&t, None, &bearer).0);
        bearer.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert!(!presents_token(&t, None, &bearer).0);
    }

    #[test]
    fn only_loopback_host_names_pass_without_a_token() {
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:80",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil.example",
            "[fe80::1]:80",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }
}
