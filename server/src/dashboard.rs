//! The dashboard: one HTML page, its script, its stylesheet and its icon, compiled into the binary
//! so the server needs no files besides its data and downloads. The page only calls the
//! REST API (with the session cookie) and listens to `/api/v1/events`.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/app.css");
const ICON: &str = include_str!("../assets/favicon.svg");

/// Only this server's own script, style and API: an injected `<script>` or inline
/// handler does not run, and no other site can frame the page.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| serve("text/html; charset=utf-8", INDEX)))
        .route(
            "/assets/app.js",
            get(|| serve("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/assets/app.css",
            get(|| serve("text/css; charset=utf-8", STYLE)),
        )
        // Browsers ask for /favicon.ico whatever the page links to.
        .route("/favicon.ico", get(|| serve("image/svg+xml", ICON)))
        .route("/assets/favicon.svg", get(|| serve("image/svg+xml", ICON)))
}

async fn serve(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The assets change with the binary; revalidating them costs little.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}
