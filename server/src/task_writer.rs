//! Task creation for the sessions: one writer task takes every session's new update
//! task and writes whatever has queued up meanwhile in one transaction. A promote
//! nudges every connected agent at once; one commit per task would make the last of
//! 19,000 agents wait for 18,999 commits, a batch makes it wait for a few.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::clock::now_ms;
use crate::store::{NewTask, Store, StoreError, StoreResult, TaskKind, TaskStatus, UpdateTask};

/// At most this many tasks in one transaction, so no session waits behind an
/// unbounded batch.
const MAX_BATCH: usize = 2_000;

/// Requests waiting beyond the batch being written: a session asking for a task while
/// the queue is full waits its turn (each session has at most one request out).
const QUEUE: usize = 2 * MAX_BATCH;

/// A new task, owned, on its way to the writer.
#[derive(Debug, Clone)]
pub(crate) struct TaskRequest {
    pub(crate) agent_id: String,
    pub(crate) from_version: String,
    pub(crate) to_version: String,
    pub(crate) os: String,
    pub(crate) arch: String,
    pub(crate) kind: TaskKind,
    pub(crate) status: TaskStatus,
    pub(crate) rollout_id: Option<String>,
    pub(crate) wave: Option<usize>,
    pub(crate) mirror: Option<String>,
}

impl TaskRequest {
    fn as_new(&self) -> NewTask<'_> {
        NewTask {
            agent_id: &self.agent_id,
            from_version: &self.from_version,
            to_version: &self.to_version,
            os: &self.os,
            arch: &self.arch,
            kind: self.kind,
            status: self.status,
            rollout_id: self.rollout_id.as_deref(),
            wave: self.wave,
            mirror: self.mirror.as_deref(),
        }
    }
}

type Reply = oneshot::Sender<StoreResult<Option<UpdateTask>>>;

#[derive(Clone)]
pub(crate) struct TaskWriter {
    queue: mpsc::Sender<(TaskRequest, Reply)>,
}

impl TaskWriter {
    /// Starts the writer; it ends when every `TaskWriter` clone is gone.
    pub(crate) fn start(store: Arc<dyn Store>) -> TaskWriter {
        let (queue, requests) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store, requests));
        TaskWriter { queue }
    }

    /// Creates the task; `Conflict` when the agent already has an unfinished one.
    pub(crate) async fn create(&self, request: TaskRequest) -> StoreResult<UpdateTask> {
        let agent_id = request.agent_id.clone();
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((request, reply))
            .await
            .map_err(|_| StoreError::Other("the task writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Other("the task writer has stopped".into()))??
            .ok_or_else(|| {
                StoreError::Conflict(format!("agent {agent_id} already has an unfinished task"))
            })
    }
}

/// Writes the first request at once (an idle server adds no delay), and while that
/// write runs, the next batch gathers in the queue.
async fn write_batches(store: Arc<dyn Store>, mut requests: mpsc::Receiver<(TaskRequest, Reply)>) {
    let mut batch = Vec::new();
    while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // In agent order, the batch's rows land side by side in every index that starts
        // with the agent (and in the rollout's targets the triggers rewrite) rather than
        // on a random page each (BENCHMARKS.md, bench-promote).
        batch.sort_unstable_by(|(a, _), (b, _)| a.agent_id.cmp(&b.agent_id));
        let tasks: Vec<NewTask<'_>> = batch.iter().map(|(request, _)| request.as_new()).collect();
        let result = store.create_tasks(&tasks, now_ms()).await;
        drop(tasks);
        match result {
            Ok(created) => {
                for ((_, reply), task) in batch.drain(..).zip(created) {
                    let _ = reply.send(Ok(task));
                }
            }
            Err(err) => {
                tracing::warn!(tasks = batch.len(), error = %err, "could not create update tasks");
                let message = err.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Other(message.clone())));
                }
            }
        }
    }
}
