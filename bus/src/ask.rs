//! Questions every node answers at once, over core NATS (nothing stored):
//! what the console asks of the whole cluster, such as where a device is
//! connected. A question goes to `fleetgate.ask.<what>` with a reply
//! inbox; each other node answers there with its label and its answer.
//! Both are sealed (the question over its subject, inbox and body; the
//! answer over the inbox, the label and the body), so nobody without the
//! cluster's key can ask or answer. A node that does not answer within
//! the bound is left out: the asker says what it heard, not what is.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::StreamExt;

use super::{seal, Bus, BusError};

const ASK_PREFIX: &str = "fleetgate.ask.";
/// Who asked (its run's name): a node does not answer itself.
const ASKER: &str = "fleetgate-asker";
/// Who answered, as the operator knows it.
const LABEL: &str = "fleetgate-node";

/// One node's answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The node's label (what it answers with, [`Bus::answer`]).
    pub node: String,
    pub body: Vec<u8>,
}

/// What a node answers a question with: `None` to say nothing.
pub type Answerer = Arc<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

impl Bus {
    /// Asks every other node `what`, and gathers their answers: until
    /// `quiet` passes with no new one after the first, or `wait` in all.
    pub async fn ask(
        &self,
        what: &str,
        body: Vec<u8>,
        wait: Duration,
        quiet: Duration,
    ) -> Result<Vec<Answer>, BusError> {
        self.connected()?;
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError(format!("asking {what}: {e}")))?;
        let subject = format!("{ASK_PREFIX}{what}");
        let mut headers = HeaderMap::new();
        let sealed = self
            .key
            .seal(&[subject.as_bytes(), inbox.as_bytes(), &body]);
        headers.insert(seal::HEADER, sealed.as_str());
        headers.insert(ASKER, self.node.as_str());
        self.client
            .publish_with_reply_and_headers(subject, inbox.clone(), headers, body.into())
            .await
            .map_err(|e| BusError(format!("asking {what}: {e}")))?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            let until = if out.is_empty() {
                deadline
            } else {
                deadline.min(tokio::time::Instant::now() + quiet)
            };
            let Ok(Some(m)) = tokio::time::timeout_at(until, answers.next()).await else {
                break;
            };
            let label = m
                .headers
                .as_ref()
                .and_then(|h| h.get(LABEL))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            let sealed = m.headers.as_ref().and_then(|h| h.get(seal::HEADER));
            if !self.key.verify(
                &[inbox.as_bytes(), label.as_bytes(), &m.payload],
                sealed.map(|v| v.as_str()),
            ) {
                self.metrics.dropped();
                tracing::warn!(reason = "bus", "bus: dropped an answer no node sealed");
                continue;
            }
            out.push(Answer {
                node: label,
                body: m.payload.to_vec(),
            });
        }
        Ok(out)
    }

    /// Answers every other node's question `what` with `f`, as `label`,
    /// from now on (resubscribing after NATS comes back). Questions no
    /// node sealed are dropped.
    pub fn answer(self: &Arc<Self>, what: &str, label: String, f: Answerer) {
        let bus = self.clone();
        let subject = format!("{ASK_PREFIX}{what}");
        tokio::spawn(async move {
            loop {
                match bus.client.subscribe(subject.clone()).await {
                    Ok(mut questions) => {
                        while let Some(q) = questions.next().await {
                            bus.answer_one(&subject, &label, &f, q).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "bus: answering {subject}; resuming"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn answer_one(&self, subject: &str, label: &str, f: &Answerer, q: async_nats::Message) {
        let Some(reply) = q.reply.as_ref().map(|r| r.as_str().to_owned()) else {
            return;
        };
        let headers = q.headers.as_ref();
        if headers
            .and_then(|h| h.get(ASKER))
            .is_some_and(|a| a.as_str() == self.node)
        {
            return;
        }
        let sealed = headers.and_then(|h| h.get(seal::HEADER));
        if !self.key.verify(
            &[subject.as_bytes(), reply.as_bytes(), &q.payload],
            sealed.map(|v| v.as_str()),
        ) {
            self.metrics.dropped();
            tracing::warn!(reason = "bus", subject = %subject, "bus: dropped a question no node sealed");
            return;
        }
        let Some(body) = f(&q.payload) else { return };
        let mut headers = HeaderMap::new();
        let sealed = self.key.seal(&[reply.as_bytes(), label.as_bytes(), &body]);
        headers.insert(seal::HEADER, sealed.as_str());
        headers.insert(LABEL, label);
        if let Err(e) = self
            .client
            .publish_with_headers(reply, headers, body.into())
            .await
        {
            tracing::debug!(error = %e, "bus: an answer was not sent");
        }
    }
}
