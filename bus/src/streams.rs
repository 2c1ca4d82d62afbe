//! The bus's JetStream streams, made (or found) when a node starts. A
//! cluster that just started, or is busy electing, may not answer a
//! stream's creation in time although it goes on to make it: creation is
//! idempotent, so it is asked again until [`PATIENCE`] is spent, and the
//! node says what it waits for.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// How long a node waits for JetStream to make its streams.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The stream `config` names, made if it is not there.
pub async fn ensure(
    js: &jetstream::Context,
    config: stream::Config,
) -> anyhow::Result<stream::Stream> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let name = config.name.clone();
    let mut pause = Duration::from_millis(200);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = match tokio::time::timeout(left, js.get_or_create_stream(config.clone())).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        // Only a timeout, or a cluster without a leader yet, is worth
        // waiting out; anything else (a conflicting stream, no
        // permission) is said at once.
        let transient = e.contains("timed out")
            || e.contains("no answer")
            || e.contains("temporarily unavailable")
            || e.contains("insufficient resources");
        if !transient || tokio::time::Instant::now() + pause >= deadline {
            anyhow::bail!(
                "the {name} stream on NATS JetStream: {e} (waited up to {} s)",
                PATIENCE.as_secs()
            );
        }
        tracing::warn!(stream = %name, error = %e, "bus: JetStream has not made the stream yet; asking again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
