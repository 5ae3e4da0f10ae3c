//! `GET /api/v1/events`: the dashboard's live feed as server-sent events. Each message
//! is one `events::Event` as JSON. The stream ends when the server shuts down or the
//! caller's token is revoked (checked every `RECHECK`), and the `retry` hint brings the
//! browser's `EventSource` back soon after a restart.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::{Stream, StreamExt, stream};
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, Caller};
use crate::AppState;
use crate::events::Event;
use crate::store::Role;

/// How soon a browser reconnects after losing the stream.
const RETRY: Duration = Duration::from_secs(2);
/// Comments on a quiet stream, so proxies keep it open and a dead peer is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often an open stream checks that its token still holds.
const RECHECK: Duration = Duration::from_secs(5);

/// Changes as they happen: `{"kind": "agent"|"task"|"rollout"|"release"|"settings"|"resync",
/// "id": ..., "agent"?: ..., "rollout"?: ...}` (a task names its agent and rollout). The
/// dashboard authenticates with its session cookie (`EventSource` cannot send headers); a
/// bearer token works too.
#[utoipa::path(
    get,
    path = "/events",
    operation_id = "events",
    tag = "events",
    responses((
        status = 200,
        description = "A `text/event-stream`; each `data:` line is `{\"kind\", \"id\"}` JSON",
        content_type = "text/event-stream",
        body = String,
    )),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn stream(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    caller.require(Role::Viewer)?;
    let receiver = state.events.subscribe();
    let hello = SseEvent::default().retry(RETRY).comment("drover events");
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.reset();
    let notes = stream::unfold(
        (receiver, state, caller, recheck),
        |(mut receiver, state, caller, mut recheck)| async move {
            let event = loop {
                tokio::select! {
                    received = receiver.recv() => break match received {
                        Ok(event) => event,
                        Err(RecvError::Lagged(_)) => Event::resync(),
                        Err(RecvError::Closed) => return None,
                    },
                    _ = recheck.tick() => {
                        if !caller.still_valid(&state).await {
                            return None;
                        }
                    }
                    () = state.shutdown.cancelled() => return None,
                }
            };
            let data = serde_json::to_string(&event).expect("an event serializes");
            Some((
                Ok(SseEvent::default().data(data)),
                (receiver, state, caller, recheck),
            ))
        },
    );
    let stream = stream::once(async move { Ok(hello) }).chain(notes);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
