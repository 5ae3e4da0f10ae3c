//! Task creation for the sessions: one writer task takes every session's new update
//! task and writes whatever has queued up meanwhile in one transaction. A promote
//! nudges every connected agent at once; one commit per task would make the last of
//! 19,000 agents wait for 18,999 commits, a batch makes it wait for a few.
//!
//! A session may also send its update before the task is written (`begin`): the task's
//! id is made here, the session sends, then waits for the write before it reads
//! anything more from its agent. Until the write ends the task is *being written*, and
//! a download for it waits (`until_written`): the agent can do nothing with the update until
//! its task exists, so the rollout's fan-out does not wait for thousands of rows. An
//! API request waits for every update sent before it (`until_sent_written`), so no
//! answer of this node leaves out a task whose update an agent already holds.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::now_ms;
use crate::store::{
    NewTask, Store, StoreError, StoreResult, TaskKind, TaskStatus, UpdateTask, new_task_id,
};

/// How long anyone waits for a task being written before going on without it.
const WRITE_WAIT: Duration = Duration::from_secs(10);

/// At most this many tasks in one transaction, so no session waits behind an
/// unbounded batch.
const MAX_BATCH: usize = 2_000;

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

/// A task on its way to the writer, with its id and whom to answer.
struct Queued {
    id: String,
    request: TaskRequest,
    reply: Reply,
    /// Its update went out before it was written (`begin`): its place in the order the
    /// updates were sent.
    sent_first: Option<u64>,
}

#[derive(Clone)]
pub(crate) struct TaskWriter {
    queue: mpsc::Sender<Queued>,
    being_written: Arc<BeingWritten>,
}

/// The tasks sent before they were written, and their agents, until their batch's
/// write ends; the watch's value changes after each batch.
#[derive(Default)]
struct BeingWritten {
    pending: Mutex<Pending>,
    ended: watch::Sender<u64>,
    /// The last batch's write failed: until one succeeds, updates wait for their tasks
    /// (`sends_first`), so a database refusing writes is not an update and a `cancel`
    /// to the agent at every check.
    failing: AtomicBool,
}

#[derive(Default)]
struct Pending {
    tasks: HashSet<String>,
    /// A session has at most one task out, and a new session of its agent waits for it
    /// (`until_agent_written`), so an agent is here for one task at a time.
    agents: HashSet<String>,
    /// The places of these tasks in the order `begin` made them, and the next place.
    order: BTreeSet<u64>,
    next: u64,
}

impl BeingWritten {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pending {
    /// Adds a task being written; answers its place in the order.
    fn add(&mut self, id: &str, agent: &str) -> u64 {
        let place = self.next;
        self.next += 1;
        self.tasks.insert(id.to_owned());
        self.agents.insert(agent.to_owned());
        self.order.insert(place);
        place
    }

    fn remove(&mut self, id: &str, agent: &str, place: u64) {
        self.tasks.remove(id);
        self.agents.remove(agent);
        self.order.remove(&place);
    }

    /// Whether a task made before place `next` is still being written.
    fn any_before(&self, next: u64) -> bool {
        self.order.first().is_some_and(|&first| first < next)
    }
}

/// A task `begin` made: sent now, written soon.
pub(crate) struct Writing {
    /// The task as its row will be written.
    pub(crate) task: UpdateTask,
    answer: oneshot::Receiver<StoreResult<Option<UpdateTask>>>,
}

impl std::fmt::Debug for Writing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writing")
            .field("task", &self.task.id)
            .finish()
    }
}

impl Writing {
    /// The written task; `Conflict` when the agent already had an unfinished one.
    pub(crate) async fn written(self) -> StoreResult<UpdateTask> {
        let agent_id = self.task.agent_id;
        created(agent_id, self.answer.await)
    }
}

impl TaskWriter {
    /// Starts the writer for a node of at most `sessions` sessions; it ends when every
    /// `TaskWriter` clone is gone. A session has at most one task out (it waits for its
    /// write before it reads on), so a queue of `sessions` never holds a session up: a
    /// fan-out's updates do not wait for room behind the batches before them.
    pub(crate) fn start(store: Arc<dyn Store>, sessions: usize) -> TaskWriter {
        let (queue, requests) = mpsc::channel(sessions.max(MAX_BATCH));
        let being_written = Arc::new(BeingWritten::default());
        tokio::spawn(write_batches(store, requests, being_written.clone()));
        TaskWriter {
            queue,
            being_written,
        }
    }

    /// Whether an update may go out before its task is written (`begin`): not while
    /// the last write of tasks failed, so an update is sent only once it can be kept.
    pub(crate) fn sends_first(&self) -> bool {
        !self.being_written.failing.load(Ordering::Relaxed)
    }

    /// Creates the task; `Conflict` when the agent already has an unfinished one.
    pub(crate) async fn create(&self, request: TaskRequest) -> StoreResult<UpdateTask> {
        let agent_id = request.agent_id.clone();
        let (reply, answer) = oneshot::channel();
        self.enqueue(Queued {
            id: new_task_id(),
            request,
            reply,
            sent_first: None,
        })
        .await?;
        created(agent_id, answer.await)
    }

    /// Names the task and queues it for writing; the task is `being_written` until its
    /// batch's write ends, and `Writing::written` answers how it ended.
    pub(crate) async fn begin(&self, request: TaskRequest) -> StoreResult<Writing> {
        let id = new_task_id();
        let task = request.as_new().made(&id, now_ms());
        let (reply, answer) = oneshot::channel();
        let place = self.being_written.pending().add(&id, &request.agent_id);
        let queued = self
            .enqueue(Queued {
                id,
                request,
                reply,
                sent_first: Some(place),
            })
            .await;
        if queued.is_err() {
            self.being_written
                .pending()
                .remove(&task.id, &task.agent_id, place);
        }
        queued.map(|()| Writing { task, answer })
    }

    async fn enqueue(&self, queued: Queued) -> StoreResult<()> {
        self.queue
            .send(queued)
            .await
            .map_err(|_| StoreError::Other("the task writer has stopped".into()))
    }

    /// Waits, at most `WRITE_WAIT`, while the task `id` is being written: a download for
    /// it goes on once the task exists.
    pub(crate) async fn until_written(&self, id: &str) {
        self.until(|pending| pending.tasks.contains(id)).await;
    }

    /// Waits, at most `WRITE_WAIT`, while a task of `agent` is being written: a new
    /// session of the agent reads its unfinished task once that one is there.
    pub(crate) async fn until_agent_written(&self, agent: &str) {
        self.until(|pending| pending.agents.contains(agent)).await;
    }

    /// Waits, at most `WRITE_WAIT`, while a task whose update went out before this call
    /// is being written: an API answer then counts every update an agent holds.
    pub(crate) async fn until_sent_written(&self) {
        let next = self.being_written.pending().next;
        self.until(|pending| pending.any_before(next)).await;
    }

    async fn until(&self, being_written: impl Fn(&Pending) -> bool) {
        let mut ended = self.being_written.ended.subscribe();
        let wait = async {
            while being_written(&self.being_written.pending()) {
                if ended.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(WRITE_WAIT, wait).await;
    }
}

/// A writer's answer as the created task or why there is none.
fn created(
    agent_id: String,
    answer: Result<StoreResult<Option<UpdateTask>>, oneshot::error::RecvError>,
) -> StoreResult<UpdateTask> {
    answer
        .map_err(|_| StoreError::Other("the task writer has stopped".into()))??
        .ok_or_else(|| {
            StoreError::Conflict(format!("agent {agent_id} already has an unfinished task"))
        })
}

/// Writes the first request at once (an idle server adds no delay), and while that
/// write runs, the next batch gathers in the queue.
async fn write_batches(
    store: Arc<dyn Store>,
    mut requests: mpsc::Receiver<Queued>,
    being_written: Arc<BeingWritten>,
) {
    let mut batch = Vec::new();
    while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // In agent order, the batch's rows land side by side in every index that starts
        // with the agent (and in the rollout's targets the triggers rewrite) rather than
        // on a random page each (BENCHMARKS.md, bench-promote).
        batch.sort_unstable_by(|a, b| a.request.agent_id.cmp(&b.request.agent_id));
        let tasks: Vec<NewTask<'_>> = batch.iter().map(|q| q.request.as_new()).collect();
        let ids: Vec<String> = batch.iter().map(|q| q.id.clone()).collect();
        let result = store.create_tasks_as(&tasks, &ids, now_ms()).await;
        drop(tasks);
        // Ended, either way: whoever waits for one of these goes on to the store.
        {
            let mut pending = being_written.pending();
            for queued in &batch {
                if let Some(place) = queued.sent_first {
                    pending.remove(&queued.id, &queued.request.agent_id, place);
                }
            }
        }
        being_written.ended.send_modify(|n| *n = n.wrapping_add(1));
        being_written
            .failing
            .store(result.is_err(), Ordering::Relaxed);
        match result {
            Ok(created) => {
                for (queued, task) in batch.drain(..).zip(created) {
                    let _ = queued.reply.send(Ok(task));
                }
            }
            Err(err) => {
                tracing::warn!(tasks = batch.len(), error = %err, "could not create update tasks");
                let message = err.to_string();
                for queued in batch.drain(..) {
                    let _ = queued.reply.send(Err(StoreError::Other(message.clone())));
                }
            }
        }
    }
}
