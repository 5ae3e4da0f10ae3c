//! The storage story: the whole `Store` trait exercised in the order the product uses it,
//! against a real SQLite file and, when one can be reached, a fresh PostgreSQL database.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::time::Duration;

use futures_util::FutureExt;
use server::store::{
    AgentFacts, AgentFilter, AuditEntry, Bootstrap, ChannelScope, Enrolled, Enrollment,
    FailureClass, HeartbeatRecord, HierarchySetting, LiveSince, MirrorCount, NewRollout, NewTask,
    PostgresStore, Queries, Role, RolloutKind, RolloutTarget, SessionChange, SilentTasks,
    SqliteStore, StageInputs, Store, StoreError, TargetPage, TaskKind, TaskStatus, TransferRecord,
    UpdateTask,
};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// When the story's bootstrap enrollment token expires: long after every step.
const BOOTSTRAP_EXPIRY: i64 = 9_000_000_000_000;

/// No record counts as live: every enrollment of a known machine re-binds it.
const NONE_LIVE: LiveSince = LiveSince {
    node_beat_ms: i64::MAX,
    seen_ms: i64::MAX,
};

/// The enrollment that happened; a conflict where none is expected fails the test.
fn enrolled(enrollment: Enrollment) -> Enrolled {
    match enrollment {
        Enrollment::Enrolled(enrolled) => enrolled,
        Enrollment::Conflict { agent_id, .. } => panic!("unexpected conflict with {agent_id}"),
    }
}

fn facts(fingerprint: &str, hostname: &str, version: &str) -> AgentFacts {
    AgentFacts {
        fingerprint: fingerprint.into(),
        hostname: hostname.into(),
        version: version.into(),
        os: "linux".into(),
        arch: "amd64".into(),
        auto_update: true,
    }
}

/// Bootstraps `store` with the enrollment token whose hash is `enroll-hash`.
async fn bootstrapped(store: &dyn Store) {
    store
        .bootstrap(&Bootstrap {
            admin_token_hash: Some("admin-hash".into()),
            enroll_token_hash: Some("enroll-hash".into()),
            enroll_token_expires_at_ms: None,
        })
        .await
        .unwrap();
}

/// Enrolls an agent on 1.0.0 with secret `s1` at `at_ms`; answers its id.
async fn enroll_one(store: &dyn Store, fingerprint: &str, hostname: &str, at_ms: i64) -> String {
    store
        .enroll(
            "enroll-hash",
            &facts(fingerprint, hostname, "1.0.0"),
            "s1",
            at_ms,
            NONE_LIVE,
        )
        .await
        .map(enrolled)
        .unwrap()
        .agent_id
}

async fn story(store: &dyn Store) {
    // First start creates what is missing, once.
    let state = store.bootstrap_state().await.unwrap();
    assert!(!state.has_admin_token && !state.has_enroll_token);
    let pieces = Bootstrap {
        admin_token_hash: Some("admin-hash".into()),
        enroll_token_hash: Some("enroll-hash".into()),
        enroll_token_expires_at_ms: Some(BOOTSTRAP_EXPIRY),
    };
    let first = store.bootstrap(&pieces).await.unwrap();
    assert!(first.created_site && first.created_admin_token && first.created_enroll_token);
    let bootstrap_token = store
        .bootstrap_state()
        .await
        .unwrap()
        .first_enroll_token
        .expect("the bootstrap enrollment token");
    assert_eq!(bootstrap_token.expires_at_ms, Some(BOOTSTRAP_EXPIRY));
    assert_eq!(bootstrap_token.max_uses, None);
    let again = store
        .bootstrap(&Bootstrap {
            admin_token_hash: Some("other-admin".into()),
            enroll_token_hash: Some("other-enroll".into()),
            enroll_token_expires_at_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(again, Default::default(), "bootstrap is idempotent");
    assert_eq!(
        store.api_token("admin-hash").await.unwrap().role,
        Role::Admin
    );
    assert!(matches!(
        store.api_token("other-admin").await,
        Err(StoreError::NotFound)
    ));

    // Enrollment: a bad token creates nothing; the same machine is re-bound.
    assert!(matches!(
        store
            .enroll("nope", &facts("fp-1", "one", "1.0.0"), "s", 1, NONE_LIVE)
            .await
            .map(enrolled),
        Err(StoreError::NotFound)
    ));
    let one = store
        .enroll(
            "enroll-hash",
            &facts("fp-1", "one", "1.0.0"),
            "secret-1",
            1_000,
            NONE_LIVE,
        )
        .await
        .map(enrolled)
        .unwrap();
    assert!(!one.rebound);
    let two = store
        .enroll(
            "enroll-hash",
            &facts("fp-2", "two", "1.0.0"),
            "secret-2",
            1_000,
            NONE_LIVE,
        )
        .await
        .map(enrolled)
        .unwrap();
    assert_ne!(one.agent_id, two.agent_id);
    let again = store
        .enroll(
            "enroll-hash",
            &facts("fp-1", "one-renamed", "1.0.1"),
            "secret-1b",
            2_000,
            NONE_LIVE,
        )
        .await
        .map(enrolled)
        .unwrap();
    assert_eq!(again.agent_id, one.agent_id);
    assert!(again.rebound);
    // A token without a limit counts each enrollment it made, re-binds included.
    let bootstrap_token = store.bootstrap_state().await.unwrap().first_enroll_token;
    assert_eq!(bootstrap_token.map(|t| t.uses), Some(3));

    // Authentication uses the newest secret only, and records the hello's facts (a
    // hostname with quotes, a backslash, a line break and more than ASCII, which every
    // read of the agent, bulk reads as JSON on SQLite included, gives back as it was).
    const HOSTNAME: &str = "one \"again\" \\ Zürich\n";
    let hello = facts("fp-1", HOSTNAME, "1.1.0");
    assert!(matches!(
        store
            .authenticate(&one.agent_id, "secret-1", &hello, 3_000)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .authenticate("no-such-agent", "secret-1b", &hello, 3_000)
            .await,
        Err(StoreError::NotFound)
    ));
    store
        .authenticate(&one.agent_id, "secret-1b", &hello, 3_000)
        .await
        .unwrap();
    let record = store.agent(&one.agent_id).await.unwrap();
    assert_eq!(
        (
            record.hostname.as_str(),
            record.version.as_str(),
            record.last_seen_ms
        ),
        (HOSTNAME, "1.1.0", 3_000)
    );

    // Heartbeats in a batch larger than one statement holds, the real agents last;
    // beats of unknown agents change nothing; last_seen never moves backwards.
    let mut batch: Vec<HeartbeatRecord> = (0..1_200)
        .map(|i| HeartbeatRecord {
            agent_id: format!("gone-{i}"),
            version: "9.9.9".into(),
            at_ms: 9_000,
            shown_secret: None,
        })
        .collect();
    batch.push(HeartbeatRecord {
        agent_id: one.agent_id.clone(),
        version: "1.2.0".into(),
        at_ms: 5_000,
        shown_secret: None,
    });
    batch.push(HeartbeatRecord {
        agent_id: two.agent_id.clone(),
        version: "1.0.0".into(),
        at_ms: 500,
        shown_secret: None,
    });
    store.record_heartbeats(&batch).await.unwrap();
    let agents = store.list_agents().await.unwrap();
    assert_eq!(agents.len(), 2);
    let by_id = |id: &str| agents.iter().find(|a| a.id == id).unwrap().clone();
    assert_eq!(by_id(&one.agent_id).version, "1.2.0");
    assert_eq!(by_id(&one.agent_id).last_seen_ms, 5_000);
    assert_eq!(by_id(&two.agent_id).last_seen_ms, 1_000);
    assert_eq!(by_id(&two.agent_id).site_id, by_id(&one.agent_id).site_id);
    // What a rollback reads of the agents on a version: each one's fraction of its
    // record, and whether there is any.
    let running = |version: &'static str| async move {
        let agents = store.running_version(version).await.unwrap();
        assert_eq!(
            store.version_runs(version).await.unwrap(),
            !agents.is_empty()
        );
        agents
    };
    for (version, agent_id) in [("1.2.0", &one.agent_id), ("1.0.0", &two.agent_id)] {
        let running = running(version).await;
        let agent = by_id(agent_id);
        let got: Vec<_> = running
            .iter()
            .map(|r| {
                let c = &r.candidate;
                (
                    (&c.id, &c.version),
                    &c.site_id,
                    &r.hostname,
                    (&c.os, &c.arch),
                    (r.paused, r.auto_update),
                    (&c.agent_channel, &c.site_channel, &c.client_channel),
                    (&r.node_id, r.node_last_beat_ms),
                )
            })
            .collect();
        assert_eq!(
            got,
            [(
                (&agent.id, &agent.version),
                &agent.site_id,
                &agent.hostname,
                (&agent.os, &agent.arch),
                (agent.paused, agent.auto_update),
                (
                    &agent.agent_channel,
                    &agent.site_channel,
                    &agent.client_channel
                ),
                (&agent.node_id, agent.node_last_beat_ms),
            )],
            "{version}"
        );
    }
    assert!(running("1.1.0").await.is_empty());
    // What a rollout's start reads of every agent: the same agents (in no order).
    let candidates = store.list_candidates().await.unwrap();
    let ids: std::collections::HashSet<&str> = candidates.iter().map(|c| c.id.as_str()).collect();
    assert_eq!((ids.len(), candidates.len()), (agents.len(), agents.len()));
    for candidate in &candidates {
        let agent = by_id(&candidate.id);
        assert_eq!(
            (
                &candidate.site_id,
                &candidate.version,
                &candidate.os,
                &candidate.arch
            ),
            (&agent.site_id, &agent.version, &agent.os, &agent.arch)
        );
    }
    assert!(matches!(
        store.agent("missing").await,
        Err(StoreError::NotFound)
    ));
    story_of_hierarchy(store, &one.agent_id, &two.agent_id).await;
    story_of_operators(store, &by_id(&one.agent_id).site_id).await;
    story_of_tasks(store, &one.agent_id, &two.agent_id).await;
}

/// Clients, sites, channels at every level, pausing and server-wide settings.
async fn story_of_hierarchy(store: &dyn Store, one: &str, two: &str) {
    let site = store.agent(one).await.unwrap().site_id;
    assert_eq!(store.enrollment_site("enroll-hash").await.unwrap(), site);
    assert!(matches!(
        store.enrollment_site("nope").await,
        Err(StoreError::NotFound)
    ));

    let acme = store.create_client("acme").await.unwrap();
    store.create_client("Zeta").await.unwrap();
    assert!(matches!(
        store.create_client("acme").await,
        Err(StoreError::Conflict(_))
    ));
    // Byte order, whatever the database's locale: upper case first.
    let clients = store.list_clients().await.unwrap();
    assert_eq!(
        clients.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["Zeta", "acme", "default"]
    );
    let lab = store.create_site(&acme.id, "lab").await.unwrap();
    assert_eq!(
        (lab.client_id.as_str(), lab.channel.as_deref()),
        (acme.id.as_str(), None)
    );
    assert!(matches!(
        store.create_site(&acme.id, "lab").await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.create_site("no-client", "lab").await,
        Err(StoreError::NotFound)
    ));
    let sites = store.list_sites().await.unwrap();
    assert_eq!(sites.len(), 2);
    let client = sites
        .iter()
        .find(|s| s.id == site)
        .unwrap()
        .client_id
        .clone();

    // Channels at each level come back with the agent, for resolution.
    store
        .set_channel(ChannelScope::Client, &client, Some("stable"))
        .await
        .unwrap();
    store
        .set_channel(ChannelScope::Site, &site, Some("beta"))
        .await
        .unwrap();
    store
        .set_channel(ChannelScope::Agent, one, Some("canary"))
        .await
        .unwrap();
    let record = store.agent(one).await.unwrap();
    assert_eq!(
        (
            record.agent_channel.as_deref(),
            record.site_channel.as_deref(),
            record.client_channel.as_deref()
        ),
        (Some("canary"), Some("beta"), Some("stable"))
    );
    let candidates = store.list_candidates().await.unwrap();
    let candidate = candidates.iter().find(|c| c.id == one).unwrap();
    assert_eq!(
        (
            candidate.agent_channel.as_deref(),
            candidate.site_channel.as_deref(),
            candidate.client_channel.as_deref()
        ),
        (Some("canary"), Some("beta"), Some("stable"))
    );
    store
        .set_channel(ChannelScope::Agent, one, None)
        .await
        .unwrap();
    assert_eq!(store.agent(one).await.unwrap().agent_channel, None);
    assert!(matches!(
        store
            .set_channel(ChannelScope::Site, "missing", Some("beta"))
            .await,
        Err(StoreError::NotFound)
    ));
    let mut under = store
        .agents_under(ChannelScope::Client, &client)
        .await
        .unwrap();
    under.sort();
    let mut both = [one.to_owned(), two.to_owned()];
    both.sort();
    assert_eq!(under, both);
    assert!(
        store
            .agents_under(ChannelScope::Site, &lab.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.agents_under(ChannelScope::Agent, two).await.unwrap(),
        [two]
    );

    // Pausing and server-wide switches.
    store.set_paused(two, true).await.unwrap();
    assert!(store.agent(two).await.unwrap().paused);
    store.set_paused(two, false).await.unwrap();
    assert!(!store.agent(two).await.unwrap().paused);
    assert!(matches!(
        store.set_paused("missing", true).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.setting("updates_enabled").await.unwrap(), None);
    store.set_setting("updates_enabled", "false").await.unwrap();
    store.set_setting("updates_enabled", "true").await.unwrap();
    assert_eq!(
        store.setting("updates_enabled").await.unwrap().as_deref(),
        Some("true")
    );
    // The first value stored wins, for every node that asks after it.
    let first = store.setting_or_insert("shared_key", "one").await.unwrap();
    assert_eq!(first, "one");
    let second = store.setting_or_insert("shared_key", "two").await.unwrap();
    assert_eq!(second, "one");
}

/// `agent`'s session claimed at `at_ms`.
fn claim(agent: &str, at_ms: i64) -> SessionChange {
    SessionChange::Claim {
        agent_id: agent.to_owned(),
        at_ms,
    }
}

/// The end of `agent`'s session claimed at `claimed_at_ms`.
fn release(agent: &str, claimed_at_ms: i64) -> SessionChange {
    SessionChange::Release {
        agent_id: agent.to_owned(),
        claimed_at_ms,
    }
}

fn ids(tasks: &[UpdateTask]) -> Vec<&str> {
    tasks.iter().map(|t| t.id.as_str()).collect()
}

/// Update tasks from creation to their end, and what rollouts learn from them.
async fn story_of_tasks(store: &dyn Store, one: &str, two: &str) {
    let new = |agent_id, status| NewTask {
        agent_id,
        from_version: "1.2.0",
        to_version: "2.0.0",
        os: "linux",
        arch: "amd64",
        kind: TaskKind::Update,
        status,
        rollout_id: None,
        wave: None,
        mirror: None,
    };

    // Queued for an agent that is away: nothing sent, so never stale.
    let queued = store
        .create_task(&new(one, TaskStatus::Queued), 10_000)
        .await
        .unwrap();
    assert_eq!(
        (queued.status, queued.attempts, queued.dispatched_at_ms),
        (TaskStatus::Queued, 0, None)
    );
    assert!(matches!(
        store
            .create_task(&new(one, TaskStatus::Dispatched), 10_000)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.active_task(one).await.unwrap(), Some(queued.clone()));
    assert_eq!(store.active_task(two).await.unwrap(), None);
    assert_eq!(store.task(&queued.id).await.unwrap(), Some(queued.clone()));
    assert_eq!(store.task("no-such-task").await.unwrap(), None);
    assert!(
        store
            .stale_tasks(i64::MAX, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );

    // Dispatch and progress move it along; only strictly older activity is stale.
    let sent = store
        .record_dispatch(&queued.id, 11_000, true, Some("https://mirror.example.com"))
        .await
        .unwrap();
    assert_eq!(
        (sent.status, sent.attempts, sent.dispatched_at_ms),
        (TaskStatus::Dispatched, 1, Some(11_000))
    );
    assert!(
        store
            .stale_tasks(11_000, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(&store.stale_tasks(11_001, i64::MAX).await.unwrap()),
        [queued.id.as_str()]
    );
    // Not while its agent is connected to a live node: its session looks after it.
    store
        .node_beat("n-live", "10.0.0.9:1", 11_000)
        .await
        .unwrap();
    store
        .record_sessions("n-live", &[claim(one, 11_000)])
        .await
        .unwrap();
    assert!(store.stale_tasks(11_001, 10_000).await.unwrap().is_empty());
    assert_eq!(
        ids(&store.stale_tasks(11_001, 11_001).await.unwrap()),
        [queued.id.as_str()],
        "the node is no longer live"
    );
    store
        .record_sessions("n-live", &[release(one, 11_000)])
        .await
        .unwrap();
    // A batch of claims and releases applies in its order: a session that came and
    // went, then a newer one whose claim an older session's late release cannot undo.
    store
        .record_sessions(
            "n-live",
            &[claim(one, 11_100), release(one, 11_100), claim(one, 11_200)],
        )
        .await
        .unwrap();
    assert_eq!(
        store.agent(one).await.unwrap().node_id.as_deref(),
        Some("n-live")
    );
    store
        .record_sessions("n-live", &[claim(one, 11_300), release(one, 11_200)])
        .await
        .unwrap();
    assert_eq!(
        store.agent(one).await.unwrap().node_id.as_deref(),
        Some("n-live"),
        "the release of the replaced session left the newer claim"
    );
    store
        .record_sessions("n-live", &[release(one, 11_300)])
        .await
        .unwrap();
    assert_eq!(store.agent(one).await.unwrap().node_id, None);
    let moving = store
        .record_progress(one, &queued.id, TaskStatus::Downloading, 10, 100, 12_000)
        .await
        .unwrap();
    assert_eq!(
        (
            moving.status,
            moving.bytes_done,
            moving.bytes_total,
            moving.last_activity_ms()
        ),
        (TaskStatus::Downloading, 10, 100, 12_000)
    );
    assert!(
        store
            .stale_tasks(12_000, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store
            .record_progress(two, &queued.id, TaskStatus::Installing, 0, 0, 12_500)
            .await,
        Err(StoreError::NotFound)
    ));

    // The update offered a mirror; the agent reports how the build reaches it.
    assert_eq!(sent.mirror.as_deref(), Some("https://mirror.example.com"));
    let fell_back = store
        .record_transfer(
            one,
            &queued.id,
            &TransferRecord {
                source: "server",
                fallback: Some("wrong_bytes"),
                error: Some("checksum mismatch"),
                kind: "compressed",
                bytes: Some(2_200_000),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            fell_back.transfer_source.as_deref(),
            fell_back.transfer_fallback.as_deref(),
            fell_back.transfer_error.as_deref(),
            fell_back.status
        ),
        (
            Some("server"),
            Some("wrong_bytes"),
            Some("checksum mismatch"),
            TaskStatus::Downloading
        )
    );
    assert_eq!(
        (fell_back.transfer_kind.as_deref(), fell_back.transfer_bytes),
        (Some("compressed"), Some(2_200_000))
    );
    assert!(matches!(
        store
            .record_transfer(
                two,
                &queued.id,
                &TransferRecord {
                    source: "mirror",
                    fallback: None,
                    error: None,
                    kind: "full",
                    bytes: None,
                }
            )
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.mirror_counts(0).await.unwrap(),
        [MirrorCount {
            mirror: "https://mirror.example.com".into(),
            source: "server".into(),
            fallback: Some("wrong_bytes".into()),
            tasks: 1
        }]
    );
    assert!(
        store.mirror_counts(10_001).await.unwrap().is_empty(),
        "created before"
    );
    let seen = store
        .mirror_transfers("https://mirror.example.com", true, 5)
        .await
        .unwrap();
    assert_eq!(
        (
            seen.len(),
            seen[0].fallback.as_deref(),
            seen[0].error.as_deref()
        ),
        (1, Some("wrong_bytes"), Some("checksum mismatch"))
    );
    assert!(
        store
            .mirror_transfers("https://other.example.com", false, 5)
            .await
            .unwrap()
            .is_empty()
    );

    // A resend after a reconnect is not an attempt.
    let resent = store
        .record_dispatch(&queued.id, 12_100, false, None)
        .await
        .unwrap();
    assert_eq!(
        (resent.attempts, resent.dispatched_at_ms),
        (1, Some(12_100))
    );

    // A task ends once, with its class; only a build failure counts against the agent.
    let failed = store
        .finish_task(
            one,
            &queued.id,
            TaskStatus::Failed,
            Some(FailureClass::Environment),
            Some("disk full"),
            13_000,
        )
        .await
        .unwrap();
    assert_eq!(
        (
            failed.status,
            failed.error.as_deref(),
            failed.updated_at_ms,
            failed.failure_class,
            failed.finished_at_ms
        ),
        (
            TaskStatus::Failed,
            Some("disk full"),
            13_000,
            Some(FailureClass::Environment),
            Some(13_000)
        )
    );
    assert!(matches!(
        store
            .finish_task(one, &queued.id, TaskStatus::Succeeded, None, None, 13_500)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.record_dispatch(&queued.id, 13_500, true, None).await,
        Err(StoreError::NotFound)
    ));
    assert!(store.failed_versions(one).await.unwrap().is_empty());
    let broken = store
        .create_task(&new(one, TaskStatus::Dispatched), 13_600)
        .await
        .unwrap();
    store
        .finish_task(
            one,
            &broken.id,
            TaskStatus::RolledBack,
            Some(FailureClass::Build),
            Some("exited during probation"),
            13_700,
        )
        .await
        .unwrap();
    assert_eq!(store.failed_versions(one).await.unwrap(), ["2.0.0"]);
    assert!(store.failed_versions(two).await.unwrap().is_empty());

    // A forced task is sent at once.
    let forced = store
        .create_task(
            &NewTask {
                kind: TaskKind::Forced,
                ..new(one, TaskStatus::Dispatched)
            },
            14_000,
        )
        .await
        .unwrap();
    assert_eq!(
        (forced.kind, forced.attempts, forced.dispatched_at_ms),
        (TaskKind::Forced, 1, Some(14_000))
    );
    assert_eq!(
        ids(&store.tasks_for_agent(one, 10).await.unwrap()),
        [forced.id.as_str(), broken.id.as_str(), queued.id.as_str()]
    );
    assert_eq!(store.tasks_for_agent(one, 1).await.unwrap().len(), 1);

    // Tasks created in the same millisecond are listed newest first too.
    let earlier = store
        .create_task(&new(two, TaskStatus::Dispatched), 15_000)
        .await
        .unwrap();
    store
        .finish_task(two, &earlier.id, TaskStatus::Succeeded, None, None, 15_000)
        .await
        .unwrap();
    let later = store
        .create_task(&new(two, TaskStatus::Dispatched), 15_000)
        .await
        .unwrap();
    assert_eq!(
        ids(&store.tasks_for_agent(two, 10).await.unwrap()),
        [later.id.as_str(), earlier.id.as_str()]
    );

    // Cancelling a version ends its unfinished tasks, once.
    // Blocking a version cancels its unfinished tasks in the same transaction, once, and
    // no task to it is made while it is blocked.
    let mut cancelled = store
        .block_version("2.0.0", "bad", "blocked", 16_000)
        .await
        .unwrap();
    cancelled.sort();
    let mut both = [one.to_owned(), two.to_owned()];
    both.sort();
    assert_eq!(cancelled, both);
    assert!(
        store
            .block_version("2.0.0", "bad", "blocked", 16_500)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.active_task(one).await.unwrap(), None);
    let ended = store.task(&queued.id).await.unwrap().expect("kept");
    assert!(!ended.status.is_active(), "{ended:?}");
    assert!(matches!(
        store
            .create_task(&new(one, TaskStatus::Dispatched), 16_600)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.active_task(one).await.unwrap().is_none());
    assert!(store.unblock_version("2.0.0").await.unwrap());
    let ended = store.tasks_for_agent(one, 10).await.unwrap();
    assert_eq!(
        (
            ended[0].status,
            ended[0].failure_class,
            ended[0].error.as_deref()
        ),
        (
            TaskStatus::Cancelled,
            Some(FailureClass::Transient),
            Some("blocked")
        )
    );

    // Promotion marks every platform of the version.
    let build =
        |version: &str, arch: &str| (version.to_owned(), "linux".to_owned(), arch.to_owned());
    store
        .record_first_seen(
            &[
                build("2.0.0", "amd64"),
                build("2.0.0", "arm64"),
                build("2.0.1", "amd64"),
                build("2.0.0", "amd64"),
            ],
            20_000,
        )
        .await
        .unwrap();
    store.mark_promoted("2.0.0", 21_000).await.unwrap();
    let mut promoted: Vec<(String, String, Option<i64>)> = store
        .rollout_records()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.version.starts_with("2."))
        .map(|r| (r.version, r.arch, r.promoted_at_ms))
        .collect();
    promoted.sort();
    assert_eq!(
        promoted,
        [
            ("2.0.0".to_owned(), "amd64".to_owned(), Some(21_000)),
            ("2.0.0".to_owned(), "arm64".to_owned(), Some(21_000)),
            ("2.0.1".to_owned(), "amd64".to_owned(), None),
        ]
    );

    // A batch answers for each task in order; a second unfinished task for an agent is
    // refused, also when the first is earlier in the same batch.
    let before = (
        store.active_task(one).await.unwrap(),
        store.active_task(two).await.unwrap(),
    );
    let created = store
        .create_tasks(
            &[
                new(one, TaskStatus::Dispatched),
                new(two, TaskStatus::Dispatched),
                new(one, TaskStatus::Dispatched),
            ],
            30_000,
        )
        .await
        .unwrap();
    assert_eq!(created.len(), 3);
    assert_eq!(created[0].is_some(), before.0.is_none());
    assert_eq!(created[1].is_some(), before.1.is_none());
    assert_eq!(created[2], None);
    for (agent, task, earlier) in [(one, &created[0], &before.0), (two, &created[1], &before.1)] {
        let active = store.active_task(agent).await.unwrap();
        assert_eq!(active.as_ref(), task.as_ref().or(earlier.as_ref()));
        if let Some(task) = task {
            assert_eq!((task.status, task.attempts), (TaskStatus::Dispatched, 1));
            store
                .finish_task(agent, &task.id, TaskStatus::Succeeded, None, None, 30_000)
                .await
                .unwrap();
        }
    }

    // What a node holds: its agents and their unfinished tasks.
    let silent = store
        .create_tasks(
            &[
                new(one, TaskStatus::Dispatched),
                new(two, TaskStatus::Dispatched),
            ],
            40_000,
        )
        .await
        .unwrap();
    let (quiet, busy) = (silent[0].clone().unwrap(), silent[1].clone().unwrap());
    store
        .record_sessions("n-held", &[claim(one, 40_000)])
        .await
        .unwrap();
    let (agents, tasks) = store.held_by("n-held").await.unwrap();
    assert_eq!(
        agents.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        [one]
    );
    assert_eq!(tasks, [(one.to_owned(), quiet.id.clone())]);
    store
        .record_sessions("n-held", &[release(one, 40_000)])
        .await
        .unwrap();
    assert_eq!(store.held_by("n-held").await.unwrap(), (vec![], vec![]));

    // Silent tasks end as their status's group says, in one statement per group; a
    // task that reported since the cutoff, or moved to another status, stays.
    let busy = store
        .record_progress(two, &busy.id, TaskStatus::Installing, 0, 0, 41_000)
        .await
        .unwrap();
    let groups = [
        SilentTasks {
            status: TaskStatus::Dispatched,
            class: FailureClass::Transient,
            error: "silent while dispatched".into(),
            task_ids: vec![quiet.id.clone(), busy.id.clone()],
        },
        SilentTasks {
            status: TaskStatus::Installing,
            class: FailureClass::Build,
            error: "silent while installing".into(),
            task_ids: vec![busy.id.clone()],
        },
    ];
    let ended = store.time_out_tasks(&groups, 41_000, 42_000).await.unwrap();
    assert_eq!(ids(&ended), [quiet.id.as_str()]);
    assert_eq!(
        (
            ended[0].status,
            ended[0].failure_class,
            ended[0].error.as_deref(),
            ended[0].finished_at_ms
        ),
        (
            TaskStatus::TimedOut,
            Some(FailureClass::Transient),
            Some("silent while dispatched"),
            Some(42_000)
        )
    );
    let ended = store.time_out_tasks(&groups, 41_001, 43_000).await.unwrap();
    assert_eq!(ids(&ended), [busy.id.as_str()]);
    assert_eq!(
        (ended[0].failure_class, ended[0].error.as_deref()),
        (Some(FailureClass::Build), Some("silent while installing"))
    );
    assert!(
        store
            .time_out_tasks(&groups, i64::MAX, 44_000)
            .await
            .unwrap()
            .is_empty(),
        "ended tasks stay ended"
    );
    assert_eq!(store.active_task(one).await.unwrap(), None);
}

/// Tokens, enrollment limits, rollout records, blocks and the audit log.
async fn story_of_operators(store: &dyn Store, site: &str) {
    // Version snapshots count agents per platform and version, once per moment.
    store.record_version_snapshot(5_000).await.unwrap();
    store.record_version_snapshot(5_000).await.unwrap();
    let history = store.version_history(0).await.unwrap();
    assert!(!history.is_empty());
    assert!(history.iter().all(|p| p.at_ms == 5_000 && p.agents >= 1));
    let counted: i64 = history.iter().map(|p| p.agents).sum();
    assert_eq!(counted as usize, store.list_agents().await.unwrap().len());
    assert!(store.version_history(5_001).await.unwrap().is_empty());
    // A page of agents, filtered, sorted and counted in the database, is the listing's.
    let all = store.list_agents().await.unwrap();
    let everyone = AgentFilter {
        sort: "hostname",
        limit: 500,
        ..AgentFilter::default()
    };
    let (page, total) = store.agents_page(&everyone).await.unwrap();
    assert_eq!(total as usize, all.len());
    assert_eq!(page, all);
    let (page, total) = store
        .agents_page(&AgentFilter {
            limit: 1,
            offset: 1,
            descending: true,
            ..everyone.clone()
        })
        .await
        .unwrap();
    assert_eq!(total as usize, all.len());
    assert_eq!(page.as_slice(), &all[all.len() - 2..all.len() - 1]);
    let first = &all[0];
    let (page, total) = store
        .agents_page(&AgentFilter {
            q: Some(&first.hostname.to_uppercase()),
            version: Some(&first.version),
            site: Some(&first.site_id),
            paused: Some(first.paused),
            channel: Some(if first.agent_channel.as_deref() == Some("beta") {
                "beta"
            } else {
                "stable"
            })
            .filter(|_| first.site_channel.is_none() && first.client_channel.is_none()),
            ..everyone.clone()
        })
        .await
        .unwrap();
    assert!(total >= 1 && page.contains(first), "{page:?}");
    let (_, none) = store
        .agents_page(&AgentFilter {
            q: Some("%_no such host_%"),
            ..everyone.clone()
        })
        .await
        .unwrap();
    assert_eq!(none, 0);

    // The fleet counted in the database agrees with the listing, row by row.
    let agents = store.list_agents().await.unwrap();
    let counts = store.fleet_counts(0).await.unwrap();
    assert_eq!(
        counts.iter().map(|c| c.agents).sum::<i64>() as usize,
        agents.len()
    );
    for c in &counts {
        let same: Vec<_> = agents
            .iter()
            .filter(|a| (&a.os, &a.arch, &a.version) == (&c.os, &c.arch, &c.version))
            .collect();
        assert_eq!(c.agents as usize, same.len(), "{c:?}");
        assert_eq!(
            c.paused as usize,
            same.iter().filter(|a| a.paused).count(),
            "{c:?}"
        );
        let live = same
            .iter()
            .filter(|a| a.node_last_beat_ms.is_some_and(|beat| beat >= 0))
            .count();
        assert_eq!(c.online as usize, live, "{c:?}");
        let beta = same
            .iter()
            .filter(|a| {
                a.agent_channel
                    .as_ref()
                    .or(a.site_channel.as_ref())
                    .or(a.client_channel.as_ref())
                    .is_some_and(|c| c == "beta")
            })
            .count();
        assert_eq!(c.beta as usize, beta, "{c:?}");
    }

    // Tokens: minted, listed without secrets, revoked.
    let viewer = store
        .create_api_token("ci", Role::Viewer, "viewer-hash")
        .await
        .unwrap();
    assert_eq!(store.api_token("viewer-hash").await.unwrap().name, "ci");
    store.revoke_api_token(&viewer.id).await.unwrap();
    assert!(matches!(
        store.api_token("viewer-hash").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.revoke_api_token(&viewer.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store
            .list_api_tokens()
            .await
            .unwrap()
            .iter()
            .filter(|t| t.revoked)
            .count(),
        1
    );

    // Enrollment tokens run out of uses and expire.
    store
        .create_enrollment_token(site, "once", None, Some(1))
        .await
        .unwrap();
    store
        .create_enrollment_token(site, "expired", Some(10), None)
        .await
        .unwrap();
    store
        .enroll(
            "once",
            &facts("fp-3", "three", "1.0.0"),
            "s3",
            1_000,
            NONE_LIVE,
        )
        .await
        .map(enrolled)
        .unwrap();
    assert!(matches!(
        store
            .enroll(
                "once",
                &facts("fp-4", "four", "1.0.0"),
                "s4",
                1_000,
                NONE_LIVE
            )
            .await
            .map(enrolled),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .enroll(
                "expired",
                &facts("fp-5", "five", "1.0.0"),
                "s5",
                1_000,
                NONE_LIVE
            )
            .await
            .map(enrolled),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .create_enrollment_token("no-site", "x", None, None)
            .await,
        Err(StoreError::NotFound)
    ));

    // Enrollment tokens are listed with their state (never their hash) and revoked.
    let tokens = store.list_enrollment_tokens(Some(site)).await.unwrap();
    let state_of = |hash_uses: i64, max: Option<i64>| {
        tokens
            .iter()
            .find(|t| t.uses == hash_uses && t.max_uses == max)
            .map(|t| t.state(1_000))
    };
    assert_eq!(state_of(1, Some(1)), Some("used_up"), "{tokens:?}");
    assert!(state_of(0, None).is_some(), "{tokens:?}");
    assert!(
        tokens.iter().any(|t| t.state(1_000) == "expired"),
        "{tokens:?}"
    );
    let everywhere = store.list_enrollment_tokens(None).await.unwrap();
    assert!(everywhere.len() >= tokens.len());
    store
        .create_enrollment_token(site, "revocable", None, None)
        .await
        .unwrap();
    let revocable = store
        .list_enrollment_tokens(Some(site))
        .await
        .unwrap()
        .into_iter()
        .find(|t| !tokens.iter().any(|old| old.id == t.id))
        .unwrap();
    assert_eq!(revocable.state(1_000), "usable");
    store
        .revoke_enrollment_token(&revocable.id, 1_500)
        .await
        .unwrap();
    assert!(matches!(
        store.revoke_enrollment_token(&revocable.id, 1_600).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.enrollment_site("revocable").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .enroll(
                "revocable",
                &facts("fp-6", "six", "1.0.0"),
                "s6",
                2_000,
                NONE_LIVE
            )
            .await,
        Err(StoreError::NotFound)
    ));

    // A live record is never re-bound: a conflict is noted on it, the token's use is not
    // counted, and the live agent's secret still works. Once quiet it is re-bound.
    store
        .create_enrollment_token(site, "rebind", None, Some(4))
        .await
        .unwrap();
    let live = store
        .enroll(
            "rebind",
            &facts("fp-live", "live", "1.0.0"),
            "lost",
            10_000,
            NONE_LIVE,
        )
        .await
        .map(enrolled)
        .unwrap();
    let seen_recently = LiveSince {
        node_beat_ms: i64::MAX,
        seen_ms: 5_000,
    };
    // Until an agent shows it has the secret (a heartbeat after the welcome that carried
    // it), the record is live only while a node holds its session: its welcome was lost,
    // so the machine's next enrollment re-binds it at once. A heartbeat showing a secret
    // that is not the record's (one a re-enrollment replaced) changes nothing.
    let heartbeat = |shown: &str| HeartbeatRecord {
        agent_id: live.agent_id.clone(),
        version: "1.0.0".into(),
        at_ms: 10_100,
        shown_secret: Some(shown.into()),
    };
    store
        .record_heartbeats(&[heartbeat("not-its-secret")])
        .await
        .unwrap();
    let again = store
        .enroll(
            "rebind",
            &facts("fp-live", "live", "1.0.0"),
            "live-1",
            10_500,
            seen_recently,
        )
        .await
        .map(enrolled)
        .unwrap();
    assert_eq!(
        (again.agent_id.as_str(), again.rebound),
        (live.agent_id.as_str(), true),
        "a record whose welcome was lost is re-bound at once"
    );
    store
        .record_heartbeats(&[heartbeat("live-1")])
        .await
        .unwrap();
    for attempt in 1..=2 {
        let answer = store
            .enroll(
                "rebind",
                &facts("fp-live", "clone", "1.0.0"),
                "clone-secret",
                11_000 + attempt,
                seen_recently,
            )
            .await
            .unwrap();
        assert_eq!(
            answer,
            Enrollment::Conflict {
                agent_id: live.agent_id.clone(),
                count: attempt
            }
        );
    }
    let record = store.agent(&live.agent_id).await.unwrap();
    assert_eq!(
        (
            record.conflict_at_ms,
            record.conflict_count,
            record.conflict_hostname.as_deref()
        ),
        (Some(11_002), 2, Some("clone"))
    );
    assert_eq!(record.hostname, "live", "the live record is unchanged");
    store
        .authenticate(
            &live.agent_id,
            "live-1",
            &facts("fp-live", "live", "1.0.0"),
            12_000,
        )
        .await
        .unwrap();
    // Held by a node that beats: live however long ago it was seen.
    store.node_beat("node-live", "a", 12_000).await.unwrap();
    store
        .record_sessions("node-live", &[claim(&live.agent_id, 12_000)])
        .await
        .unwrap();
    let held = LiveSince {
        node_beat_ms: 11_000,
        seen_ms: i64::MAX,
    };
    assert!(matches!(
        store
            .enroll(
                "rebind",
                &facts("fp-live", "clone", "1.0.0"),
                "x",
                13_000,
                held
            )
            .await,
        Ok(Enrollment::Conflict { .. })
    ));
    store
        .record_sessions("node-live", &[release(&live.agent_id, 12_000)])
        .await
        .unwrap();
    let quiet = LiveSince {
        node_beat_ms: 11_000,
        seen_ms: 20_000,
    };
    let rebound = store
        .enroll(
            "rebind",
            &facts("fp-live", "reinstalled", "1.0.0"),
            "live-2",
            30_000,
            quiet,
        )
        .await
        .map(enrolled)
        .unwrap();
    assert_eq!(
        (rebound.agent_id.as_str(), rebound.rebound),
        (live.agent_id.as_str(), true)
    );
    // Authenticating with the secret shows it too: seen since, the record is live again.
    store
        .authenticate(
            &live.agent_id,
            "live-2",
            &facts("fp-live", "reinstalled", "1.0.0"),
            30_500,
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .enroll(
                "rebind",
                &facts("fp-live", "clone", "1.0.0"),
                "y",
                31_000,
                quiet
            )
            .await,
        Ok(Enrollment::Conflict { .. })
    ));
    let rebind_token = store
        .list_enrollment_tokens(Some(site))
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.max_uses == Some(4))
        .unwrap();
    assert_eq!(rebind_token.uses, 3, "refused enrollments use nothing");

    // Dashboard sessions last until they expire, are deleted, or their token is revoked.
    let token = store
        .create_api_token("dashboard", Role::Viewer, "dashboard-hash")
        .await
        .unwrap();
    store
        .create_session("session-1", &token.id, 1_000, 5_000)
        .await
        .unwrap();
    store
        .create_session("session-2", &token.id, 1_000, 5_000)
        .await
        .unwrap();
    store
        .create_session("session-old", &token.id, 1_000, 2_000)
        .await
        .unwrap();
    assert_eq!(
        store.session_token("session-1", 4_999).await.unwrap().id,
        token.id
    );
    assert!(matches!(
        store.session_token("session-1", 5_000).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.prune_sessions(3_000).await.unwrap(), 1);
    assert!(store.delete_session("session-1").await.unwrap());
    assert!(!store.delete_session("session-1").await.unwrap());
    assert!(store.session_token("session-2", 3_000).await.is_ok());
    store.revoke_api_token(&token.id).await.unwrap();
    assert!(matches!(
        store.session_token("session-2", 3_000).await,
        Err(StoreError::NotFound)
    ));

    // Rollout records: first sighting kept, halts and resumes, blocks.
    let key = ("1.2.0".to_owned(), "linux".to_owned(), "amd64".to_owned());
    store
        .record_first_seen(std::slice::from_ref(&key), 100)
        .await
        .unwrap();
    store
        .record_first_seen(std::slice::from_ref(&key), 900)
        .await
        .unwrap();
    let records = store.rollout_records().await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].first_seen_ms, 100);
    assert!(
        store
            .block_version("1.2.0", "bad", "rolled back", 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.blocked_versions().await.unwrap(), ["1.2.0"]);
    assert!(store.unblock_version("1.2.0").await.unwrap());
    assert!(!store.unblock_version("1.2.0").await.unwrap());

    // The audit log pages newest first and filters by action.
    for (i, action) in ["a.one", "a.two", "a.one"].iter().enumerate() {
        store
            .append_audit(&AuditEntry {
                id: 0,
                at_ms: i as i64,
                actor: "admin".into(),
                action: (*action).into(),
                target: format!("t{i}"),
                detail: None,
                result: "ok".into(),
            })
            .await
            .unwrap();
    }
    let page = store.audit(2, None, None).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
        ["t2", "t1"]
    );
    let next = store.audit(2, Some(page[1].id), None).await.unwrap();
    assert_eq!(
        next.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
        ["t0"]
    );
    assert_eq!(store.audit(10, None, Some("a.one")).await.unwrap().len(), 2);
}

#[tokio::test]
async fn sqlite_story() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let store = SqliteStore::open(&path).await.unwrap();
    story(&store).await;
    drop(store);

    // Reopening runs no migration twice and keeps every row.
    let reopened = SqliteStore::open(&path).await.unwrap();
    assert_eq!(reopened.list_agents().await.unwrap().len(), 4);
}

/// Where the PostgreSQL tests connect to create their databases.
const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Runs `test` against a database of its own on the PostgreSQL server named by
/// `DROVER_TEST_POSTGRES`, and drops that database afterwards, also when `test` panics.
/// Without a reachable server the test is skipped, except in CI, where it fails.
async fn with_postgres<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = std::env::var("DROVER_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.into());
    let options = PgConnectOptions::from_str(&server)
        .unwrap_or_else(|err| panic!("DROVER_TEST_POSTGRES is not a PostgreSQL URL: {err}"));
    let shown = format!(
        "{}@{}:{}",
        options.get_username(),
        options.get_host(),
        options.get_port()
    );
    let connected =
        match tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&server)).await {
            Ok(Ok(admin)) => Ok(admin),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("no answer within 10 s".to_owned()),
        };
    let mut admin = match connected {
        Ok(admin) => admin,
        Err(err) if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "PostgreSQL at {shown} cannot be reached ({err}), and CI=true requires the \
             PostgreSQL tests: start it (scripts/ci-setup) or point DROVER_TEST_POSTGRES at one"
        ),
        Err(err) => {
            let test = std::thread::current().name().unwrap_or("test").to_owned();
            eprintln!(
                "skipping {test}: PostgreSQL at {shown} cannot be reached ({err}); \
                 start it or set DROVER_TEST_POSTGRES to a server URL to run it"
            );
            return;
        }
    };
    let name = format!("drover_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|err| panic!("could not create the database {name} on {shown}: {err}"));

    let outcome = AssertUnwindSafe(test(with_database(&server, &name)))
        .catch_unwind()
        .await;

    // FORCE ends connections a panicking test's pools may still hold.
    if let Err(err) = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
    {
        eprintln!("could not drop the test database {name}: {err}");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// `server` (a PostgreSQL URL) naming the database `name` instead.
fn with_database(server: &str, name: &str) -> String {
    let (scheme, rest) = server.split_once("://").expect("a URL with ://");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |at| &tail[at..]);
    format!("{scheme}://{authority}/{name}{query}")
}

#[tokio::test]
async fn postgres_story() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        story(&store).await;
        drop(store);

        // Reopening runs no migration twice and keeps every row.
        let reopened = PostgresStore::open(&url).await.unwrap();
        assert_eq!(reopened.list_agents().await.unwrap().len(), 4);
    })
    .await;
}

/// A heartbeat batch does not wait for a transaction that references its agents (a
/// rollout's targets being written, a task being created): it locks their rows only
/// against other writers of the same rows, never against the key share those references
/// take. Locking them harder made a 50,000-agent rollback deadlock with the heartbeats.
#[tokio::test]
async fn postgres_heartbeats_do_not_wait_for_references_to_their_agents() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        bootstrapped(&store).await;
        let agent = enroll_one(&store, "fp-1", "one", 1_000).await;
        // What a foreign key check takes on the referenced row, held by an open
        // transaction as while a rollout's targets are inserted.
        let mut referencing = PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN")
            .execute(&mut referencing)
            .await
            .unwrap();
        sqlx::query("SELECT 1 FROM agents WHERE id = $1 FOR KEY SHARE")
            .bind(&agent)
            .execute(&mut referencing)
            .await
            .unwrap();
        let beat = HeartbeatRecord {
            agent_id: agent.clone(),
            version: "1.0.1".into(),
            at_ms: 5_000,
            shown_secret: None,
        };
        tokio::time::timeout(Duration::from_secs(5), store.record_heartbeats(&[beat]))
            .await
            .expect("the heartbeat batch waited for the referencing transaction")
            .unwrap();
        sqlx::query("ROLLBACK")
            .execute(&mut referencing)
            .await
            .unwrap();
        let row = store.list_agents().await.unwrap();
        assert_eq!(row[0].version, "1.0.1");
    })
    .await;
}

/// Session changes are written in agent id order, the order in which a heartbeat batch
/// locks its agents, so the two wait for each other and never deadlock. Written in the
/// order they came, a node's sessions ending together deadlocked with its heartbeats
/// (`bench-nodes`), and the claims of the losing batch were never written.
#[tokio::test]
async fn postgres_session_changes_and_heartbeats_never_deadlock() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        bootstrapped(&store).await;
        let one = enroll_one(&store, "fp-1", "one", 1_000).await;
        let two = enroll_one(&store, "fp-2", "two", 1_000).await;
        store.node_beat("n-1", "10.0.0.9:1", 2_000).await.unwrap();
        let (low, high) = if one.as_bytes() < two.as_bytes() {
            (one, two)
        } else {
            (two, one)
        };
        // A heartbeat batch of both agents, locking them as it does: the lower id first.
        let mut beats = PgConnection::connect(&url).await.unwrap();
        let lock = "SELECT id FROM agents WHERE id = $1 FOR NO KEY UPDATE";
        sqlx::query("BEGIN").execute(&mut beats).await.unwrap();
        sqlx::query(lock)
            .bind(&low)
            .execute(&mut beats)
            .await
            .unwrap();
        // Meanwhile the sessions' changes, the higher id's first.
        let changes = [claim(&high, 3_000), claim(&low, 3_000)];
        let writing = tokio::spawn(async move {
            let writer = PostgresStore::open(&url).await.unwrap();
            writer.record_sessions("n-1", &changes).await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The heartbeat batch goes on to the higher id. Had the changes taken it first,
        // each would now wait for the other, and the database would end one of them.
        let locked = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::query(lock).bind(&high).execute(&mut beats),
        )
        .await
        .expect("the heartbeat batch waited for the session changes");
        locked.expect("the heartbeat batch was chosen to end a deadlock");
        sqlx::query("COMMIT").execute(&mut beats).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), writing)
            .await
            .expect("the session changes never finished")
            .unwrap()
            .expect("the session changes were chosen to end a deadlock");
        for agent in [&low, &high] {
            assert_eq!(
                store.agent(agent).await.unwrap().node_id.as_deref(),
                Some("n-1")
            );
        }
    })
    .await;
}

/// Two server nodes on one database: whatever they race for happens once.
#[tokio::test]
async fn postgres_two_nodes_never_double_dispatch() {
    with_postgres(|url| async move {
        // Both nodes start at once: the migrations run once.
        let (a, b) = tokio::join!(PostgresStore::open(&url), PostgresStore::open(&url));
        let (a, b) = (a.unwrap(), b.unwrap());
        let pieces = Bootstrap {
            admin_token_hash: Some("admin-hash".into()),
            enroll_token_hash: Some("enroll-hash".into()),
            enroll_token_expires_at_ms: None,
        };
        let (first, second) = tokio::join!(a.bootstrap(&pieces), b.bootstrap(&pieces));
        let (first, second) = (first.unwrap(), second.unwrap());
        assert!(first.created_site ^ second.created_site, "one default site");
        assert_eq!(a.list_sites().await.unwrap().len(), 1);
        let agent = a
            .enroll(
                "enroll-hash",
                &facts("fp-1", "one", "1.0.0"),
                "s1",
                1_000,
                NONE_LIVE,
            )
            .await
            .map(enrolled)
            .unwrap()
            .agent_id;

        let task = NewTask {
            agent_id: &agent,
            from_version: "1.0.0",
            to_version: "1.1.0",
            os: "linux",
            arch: "amd64",
            kind: TaskKind::Update,
            status: TaskStatus::Dispatched,
            rollout_id: None,
            wave: None,
            mirror: None,
        };
        for round in 0..20 {
            let now = 10_000 + round;
            let (on_a, on_b) = tokio::join!(a.create_task(&task, now), b.create_task(&task, now));
            let created = match (on_a, on_b) {
                (Ok(task), Err(StoreError::Conflict(_)))
                | (Err(StoreError::Conflict(_)), Ok(task)) => task,
                other => panic!("round {round}: expected one task and one conflict, got {other:?}"),
            };
            let (on_a, on_b) = tokio::join!(
                a.finish_task(&agent, &created.id, TaskStatus::Succeeded, None, None, now),
                b.finish_task(
                    &agent,
                    &created.id,
                    TaskStatus::Failed,
                    Some(FailureClass::Build),
                    Some("late"),
                    now
                ),
            );
            match (on_a, on_b) {
                (Ok(_), Err(StoreError::NotFound)) | (Err(StoreError::NotFound), Ok(_)) => {}
                other => {
                    panic!("round {round}: expected one finish and one NotFound, got {other:?}")
                }
            }
        }
        assert!(a.active_task(&agent).await.unwrap().is_none());
        let tasks = b.tasks_for_agent(&agent, 100).await.unwrap();
        assert_eq!(tasks.len(), 20);
        assert!(tasks.iter().all(|t| !t.status.is_active()));
        assert!(
            tasks
                .windows(2)
                .all(|w| w[0].created_at_ms > w[1].created_at_ms)
        );

        // The last use of an enrollment token goes to one machine only.
        let site = a.list_sites().await.unwrap()[0].id.clone();
        a.create_enrollment_token(&site, "once", None, Some(1))
            .await
            .unwrap();
        let (two, three) = (
            facts("fp-2", "two", "1.0.0"),
            facts("fp-3", "three", "1.0.0"),
        );
        let agents_before = a.count_agents().await.unwrap();
        let (on_a, on_b) = tokio::join!(
            a.enroll("once", &two, "s2", 2_000, NONE_LIVE),
            b.enroll("once", &three, "s3", 2_000, NONE_LIVE),
        );
        assert!(
            matches!(
                (&on_a, &on_b),
                (Ok(_), Err(StoreError::NotFound)) | (Err(StoreError::NotFound), Ok(_))
            ),
            "expected one enrollment and one NotFound, got {on_a:?} and {on_b:?}"
        );
        // The refused one wrote no agent.
        assert_eq!(a.count_agents().await.unwrap(), agents_before + 1);

        // Overlapping heartbeat batches in opposite orders neither deadlock nor move
        // last_seen backwards.
        let other = on_a.or(on_b).map(enrolled).unwrap().agent_id;
        for round in 0..20 {
            let beat = |id: &str, at_ms: i64| HeartbeatRecord {
                agent_id: id.to_owned(),
                version: "1.1.0".into(),
                at_ms,
                shown_secret: None,
            };
            let forward = [beat(&agent, 20_000 + round), beat(&other, 20_000 + round)];
            let backward = [beat(&other, 19_000 + round), beat(&agent, 19_000 + round)];
            let (on_a, on_b) = tokio::join!(
                a.record_heartbeats(&forward),
                b.record_heartbeats(&backward)
            );
            on_a.unwrap();
            on_b.unwrap();
        }
        for id in [&agent, &other] {
            assert_eq!(a.agent(id).await.unwrap().last_seen_ms, 20_019);
        }
    })
    .await;
}

/// A rollout's targets written on one node while another node moves their agents
/// between channels: every target ends with its agent's channel, whichever commits first.
#[tokio::test]
async fn postgres_targets_never_miss_a_change_of_their_agents() {
    with_postgres(|url| async move {
        let (one, two) = (
            PostgresStore::open(&url).await.unwrap(),
            PostgresStore::open(&url).await.unwrap(),
        );
        let (a, b): (&dyn Store, &dyn Store) = (&one, &two);
        bootstrapped(a).await;
        let mut agents = Vec::new();
        for i in 0..40 {
            agents.push(enroll_one(a, &format!("fp-{i}"), &format!("host-{i}"), 1_000).await);
        }
        let targets: Vec<(String, usize)> = agents.iter().map(|id| (id.clone(), 0)).collect();
        for round in 0..15 {
            let id = format!("r-{round}");
            let channel = if round % 2 == 0 { "beta" } else { "stable" };
            let start = start_targeted(a, &id, &targets, 2_000 + round);
            let moves = async {
                for agent in &agents {
                    b.set_channel(ChannelScope::Agent, agent, Some(channel))
                        .await
                        .unwrap();
                }
            };
            tokio::join!(start, moves);
            let mut on_channel = std::collections::BTreeMap::new();
            for (_, group) in a.rollout_target_groups(&[&id], 0).await.unwrap() {
                *on_channel.entry(group.channel).or_insert(0) += group.agents;
            }
            assert_eq!(
                on_channel,
                std::collections::BTreeMap::from([(channel.to_owned(), 40)]),
                "round {round}"
            );
        }
    })
    .await;
}

/// Every migration exists for both backends under the same name.
#[test]
fn migrations_are_kept_in_step() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let names = |backend: &str| {
        let mut names: Vec<String> = std::fs::read_dir(root.join(backend))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("sqlite"), names("postgres"));
    assert!(!names("sqlite").is_empty());
}

// ---------------------------------------------------------------------------------------
// Upgrades from 0.1.0
// ---------------------------------------------------------------------------------------

/// The test data of `tests/data/0.1.0/` (see its README): a database made by Drover 0.1.0.
fn upgrade_data(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/0.1.0")
        .join(file)
}

/// What the 0.1.0 data holds must read, and be usable, after the migrations.
async fn check_upgraded(store: &dyn Store) {
    let agents = store.list_agents().await.unwrap();
    assert_eq!(agents.len(), 6);
    // Opening keyed the versions written before keys existed.
    let mut semver_agents: Vec<String> = agents
        .iter()
        .filter(|a| semver::Version::parse(&a.version).is_ok())
        .map(|a| a.version.clone())
        .collect();
    semver_agents.sort_by_key(|v| semver::Version::parse(v).unwrap());
    assert!(!semver_agents.is_empty());
    assert_eq!(older_in_page(store, "999.0.0").await, semver_agents);
    assert_eq!(
        agents
            .iter()
            .filter(|a| a.agent_channel.as_deref() == Some("beta"))
            .count(),
        1
    );
    assert_eq!(agents.iter().filter(|a| a.paused).count(), 1);
    assert_eq!(store.list_clients().await.unwrap().len(), 2);
    assert_eq!(store.list_sites().await.unwrap().len(), 2);

    let mut statuses = std::collections::BTreeMap::new();
    for agent in &agents {
        for task in store.tasks_for_agent(&agent.id, 50).await.unwrap() {
            *statuses
                .entry((
                    task.to_version.clone(),
                    task.status.as_str(),
                    task.failure_class.map(FailureClass::as_str),
                ))
                .or_insert(0) += 1;
            assert_eq!(task.rollout_id, None, "0.1.0 tasks belong to no rollout");
        }
        // A build that failed on an agent before the upgrade is still not offered to it.
        assert_eq!(store.failed_versions(&agent.id).await.unwrap(), ["1.2.0"]);
    }
    assert_eq!(
        statuses,
        std::collections::BTreeMap::from([
            (("1.1.0".to_owned(), "succeeded", None), 6),
            (("1.2.0".to_owned(), "rolled_back", Some("build")), 6),
        ])
    );
    let audit = store.audit(50, None, None).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "rollout.promote"),
        "{audit:?}"
    );
    assert!(audit.iter().any(|e| e.action == "agent.pause"), "{audit:?}");
    let builds = store.rollout_records().await.unwrap();
    assert_eq!(builds.len(), 3);
    assert!(
        builds
            .iter()
            .any(|b| b.version == "1.2.0" && b.halt_reason.is_some())
    );

    // Usable: a new task for an old agent, in the new model.
    let agent = &agents[0];
    let task = store
        .create_task(
            &NewTask {
                agent_id: &agent.id,
                from_version: &agent.version,
                to_version: "1.3.0",
                os: "linux",
                arch: "amd64",
                kind: TaskKind::Update,
                status: TaskStatus::Dispatched,
                rollout_id: None,
                wave: None,
                mirror: None,
            },
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(store.active_task(&agent.id).await.unwrap(), Some(task));
}

/// `refuse_newer_schema`'s message, from opening a database a newer server migrated.
fn newer_refusal(err: anyhow::Error) -> String {
    let text = format!("{err:#}");
    assert!(
        text.contains("upgraded by a newer drover-server (schema version 99990101000000"),
        "{text}"
    );
    text
}

const FUTURE_MIGRATION: &str = "INSERT INTO _sqlx_migrations \
     (version, description, success, checksum, execution_time) \
     VALUES (99990101000000, 'from a newer server', TRUE, X'00', 0)";

#[tokio::test]
async fn a_sqlite_database_made_by_0_1_0_migrates_with_its_data_and_a_newer_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    std::fs::copy(upgrade_data("drover.db"), &path).unwrap();
    let store = SqliteStore::open(&path).await.unwrap();
    check_upgraded(&store).await;
    drop(store);

    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query(FUTURE_MIGRATION)
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    newer_refusal(SqliteStore::open(&path).await.err().expect("refused"));
}

/// Loads the PostgreSQL database Drover 0.1.0 made into the empty database at `url`.
fn load_0_1_0(url: &str) {
    let loaded = std::process::Command::new("psql")
        .args([url, "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(upgrade_data("postgres.sql"))
        .output()
        .expect("psql runs");
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
}

#[tokio::test]
async fn a_postgres_database_made_by_0_1_0_migrates_with_its_data_and_a_newer_one_is_refused() {
    with_postgres(|url| async move {
        load_0_1_0(&url);
        let store = PostgresStore::open(&url).await.unwrap();
        check_upgraded(&store).await;
        drop(store);

        let mut db = PgConnection::connect(&url).await.unwrap();
        sqlx::query(&FUTURE_MIGRATION.replace("X'00'", "'\\x00'::bytea"))
            .execute(&mut db)
            .await
            .unwrap();
        db.close().await.unwrap();
        newer_refusal(PostgresStore::open(&url).await.err().expect("refused"));
    })
    .await;
}

/// A migration that loses a lock wait to another transaction (as to a node of the
/// previous version during a rolling upgrade) is rolled back and tried again until it
/// gets through; a failed attempt leaves no lock behind that the next one waits for.
#[tokio::test]
async fn postgres_a_migration_that_loses_a_lock_wait_is_tried_again() {
    with_postgres(|url| async move {
        load_0_1_0(&url);
        let database = url.rsplit('/').next().unwrap().to_owned();
        let mut admin = PgConnection::connect(&url).await.unwrap();
        // Every lock wait of a new session gives up after 300 ms.
        sqlx::query(&format!(
            "ALTER DATABASE \"{database}\" SET lock_timeout = '300ms'"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        // An old node reading the table migration 0006 renames, for 2.5 s.
        let mut old_node = PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut old_node).await.unwrap();
        sqlx::query("SELECT count(*) FROM rollouts")
            .execute(&mut old_node)
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            sqlx::query("COMMIT").execute(&mut old_node).await.unwrap();
        });
        let store = tokio::time::timeout(Duration::from_secs(30), PostgresStore::open(&url))
            .await
            .expect("the migration never finished")
            .expect("the migration was not tried again");
        reader.await.unwrap();
        // No session still holds the migrator's lock: another node could migrate.
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND d.datname = current_database()",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert_eq!(held, 0, "a failed attempt left the migration lock held");
        sqlx::query(&format!("ALTER DATABASE \"{database}\" RESET lock_timeout"))
            .execute(&mut admin)
            .await
            .unwrap();
        check_upgraded(&store).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------

/// Old rows go in batches; build failures, unfinished tasks and recent rows stay.
async fn retention_story(store: &dyn Store) {
    bootstrapped(store).await;
    let agent = enroll_one(store, "fp-old", "old", 1).await;
    // Finished long ago: a success, a transient failure, two build failures; then one
    // finished recently and one still under way.
    let ended = [
        (TaskStatus::Succeeded, None, 2_000),
        (TaskStatus::Failed, Some(FailureClass::Transient), 2_000),
        (TaskStatus::Succeeded, None, 2_000),
        (TaskStatus::RolledBack, Some(FailureClass::Build), 2_000),
        (TaskStatus::Failed, Some(FailureClass::Build), 2_000),
        (TaskStatus::Succeeded, None, 90_000),
    ];
    for (n, (status, class, at)) in ended.into_iter().enumerate() {
        let to = format!("1.{n}.0");
        let task = store
            .create_task(
                &NewTask {
                    agent_id: &agent,
                    from_version: "1.0.0",
                    to_version: &to,
                    os: "linux",
                    arch: "amd64",
                    kind: TaskKind::Update,
                    status: TaskStatus::Dispatched,
                    rollout_id: None,
                    wave: None,
                    mirror: None,
                },
                at - 500,
            )
            .await
            .unwrap();
        store
            .finish_task(&agent, &task.id, status, class, None, at)
            .await
            .unwrap();
    }
    let open = NewTask {
        agent_id: &agent,
        from_version: "1.0.0",
        to_version: "1.9.0",
        os: "linux",
        arch: "amd64",
        kind: TaskKind::Update,
        status: TaskStatus::Dispatched,
        rollout_id: None,
        wave: None,
        mirror: None,
    };
    store.create_task(&open, 1_000).await.unwrap();
    for (at, action) in [(1_000, "old.one"), (2_000, "old.two"), (90_000, "new.one")] {
        store
            .append_audit(&AuditEntry {
                id: 0,
                at_ms: at,
                actor: "tester".into(),
                action: action.into(),
                target: "t".into(),
                detail: None,
                result: "done".into(),
            })
            .await
            .unwrap();
    }
    for at in [1_000, 2_000, 90_000] {
        store.record_version_snapshot(at).await.unwrap();
    }
    store
        .node_beat("node-gone", "10.0.0.1:1", 1_000)
        .await
        .unwrap();
    store
        .node_beat("node-here", "10.0.0.2:1", 90_000)
        .await
        .unwrap();

    // One row a batch: every call deletes at most one.
    let mut deleted = Vec::new();
    loop {
        let n = store.prune_tasks(50_000, 1).await.unwrap();
        if n == 0 {
            break;
        }
        deleted.push(n);
    }
    assert_eq!(
        deleted,
        [1, 1, 1],
        "the three old non-build endings, one a batch"
    );
    let left: Vec<String> = store
        .tasks_for_agent(&agent, 50)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.to_version)
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["1.3.0", "1.4.0", "1.5.0", "1.9.0"]);
    let mut failed = store.failed_versions(&agent).await.unwrap();
    failed.sort();
    assert_eq!(
        failed,
        ["1.3.0", "1.4.0"],
        "build failures keep their versions off"
    );

    assert_eq!(store.prune_audit(50_000, 1).await.unwrap(), 1);
    assert_eq!(store.prune_audit(50_000, 10).await.unwrap(), 1);
    let audit = store.audit(10, None, None).await.unwrap();
    assert_eq!(
        audit.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["new.one"]
    );
    assert_eq!(store.prune_snapshots(50_000, 10).await.unwrap(), 2);
    assert_eq!(store.prune_snapshots(50_000, 10).await.unwrap(), 0);
    assert_eq!(store.prune_nodes(50_000).await.unwrap(), 1);
    assert_eq!(store.prune_nodes(50_000).await.unwrap(), 0);
}

#[tokio::test]
async fn sqlite_retention_prunes_old_rows_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("drover.db"))
        .await
        .unwrap();
    retention_story(&store).await;
}

#[tokio::test]
async fn postgres_retention_prunes_old_rows_in_batches() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        retention_story(&store).await;
    })
    .await;
}

/// One holder at a time; the holder renews; an expired lease goes to whoever asks.
async fn lease_story(store: &dyn Store) {
    assert!(store.take_lease("sweep", "a", 1_000, 4_000).await.unwrap());
    assert!(!store.take_lease("sweep", "b", 2_000, 5_000).await.unwrap());
    assert!(
        store.take_lease("sweep", "a", 3_000, 6_000).await.unwrap(),
        "renewed"
    );
    assert!(!store.take_lease("sweep", "b", 5_999, 8_000).await.unwrap());
    assert!(store.take_lease("other", "b", 5_999, 8_000).await.unwrap());
    assert!(
        store.take_lease("sweep", "b", 6_001, 9_000).await.unwrap(),
        "expired"
    );
    assert!(!store.take_lease("sweep", "a", 7_000, 10_000).await.unwrap());
}

#[tokio::test]
async fn sqlite_leases_have_one_holder_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("drover.db"))
        .await
        .unwrap();
    lease_story(&store).await;
}

#[tokio::test]
async fn postgres_leases_have_one_holder_at_a_time() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        lease_story(&store).await;
    })
    .await;
}

/// The versions of agents `older_than` `limit` by the page the database filters, and by
/// semver precedence computed here.
async fn older_in_page(store: &dyn Store, limit: &str) -> Vec<String> {
    let key = server::store::version_key(limit);
    let (page, total) = store
        .agents_page(&AgentFilter {
            older_than_key: Some(&key),
            sort: "version",
            limit: 500,
            ..AgentFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(total as usize, page.len());
    page.into_iter().map(|a| a.version).collect()
}

/// Versions compared in the database (`older_than`, sorting by version) follow semver
/// precedence, pre-releases included, whichever statement wrote the version.
async fn version_key_story(store: &dyn Store) {
    bootstrapped(store).await;
    let versions = [
        "1.10.0",
        "1.2.0",
        "1.2.0-rc.2",
        "1.2.0-rc.10",
        "1.2.0-alpha",
        "dev-build",
        "0.9.0",
    ];
    let mut ids = Vec::new();
    for (i, version) in versions.iter().enumerate() {
        let agent = store
            .enroll(
                "enroll-hash",
                &facts(&format!("fp-{i}"), &format!("host-{i}"), version),
                &format!("secret-{i}"),
                1_000,
                NONE_LIVE,
            )
            .await
            .map(enrolled)
            .unwrap();
        ids.push(agent.agent_id);
    }
    let semver_order = |limit: &str| {
        let limit = semver::Version::parse(limit).unwrap();
        let mut older: Vec<semver::Version> = store_versions(&versions)
            .into_iter()
            .filter(|v| v.cmp_precedence(&limit).is_lt())
            .collect();
        older.sort_by(|a, b| a.cmp_precedence(b));
        older.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    assert_eq!(
        older_in_page(store, "1.2.0").await,
        ["0.9.0", "1.2.0-alpha", "1.2.0-rc.2", "1.2.0-rc.10"]
    );
    for limit in ["1.2.0", "1.2.0-rc.10", "1.10.0", "0.9.0", "2.0.0"] {
        assert_eq!(
            older_in_page(store, limit).await,
            semver_order(limit),
            "{limit}"
        );
    }
    // Sorted by version: what is not semver first, then by precedence; reversed too.
    let (page, _) = store
        .agents_page(&AgentFilter {
            sort: "version",
            limit: 500,
            ..AgentFilter::default()
        })
        .await
        .unwrap();
    let sorted: Vec<&str> = page.iter().map(|a| a.version.as_str()).collect();
    assert_eq!(
        sorted,
        [
            "dev-build",
            "0.9.0",
            "1.2.0-alpha",
            "1.2.0-rc.2",
            "1.2.0-rc.10",
            "1.2.0",
            "1.10.0"
        ]
    );
    let (page, _) = store
        .agents_page(&AgentFilter {
            sort: "version",
            descending: true,
            limit: 500,
            ..AgentFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(page.first().map(|a| a.version.as_str()), Some("1.10.0"));

    // A heartbeat and a hello move the key with the version.
    store
        .record_heartbeats(&[HeartbeatRecord {
            agent_id: ids[6].clone(),
            version: "1.3.0".into(),
            at_ms: 2_000,
            shown_secret: None,
        }])
        .await
        .unwrap();
    store
        .authenticate(
            &ids[1],
            "secret-1",
            &facts("fp-1", "host-1", "1.1.0"),
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(
        older_in_page(store, "1.2.0").await,
        ["1.1.0", "1.2.0-alpha", "1.2.0-rc.2", "1.2.0-rc.10"]
    );
    assert!(
        older_in_page(store, "1.3.0")
            .await
            .contains(&"1.2.0-rc.10".to_owned())
    );
    assert!(
        !older_in_page(store, "1.3.0")
            .await
            .contains(&"1.3.0".to_owned())
    );
    // Re-enrollment re-binds the machine with the version it says now.
    store
        .enroll(
            "enroll-hash",
            &facts("fp-0", "host-0", "0.1.0-beta"),
            "secret-0b",
            3_000,
            NONE_LIVE,
        )
        .await
        .map(enrolled)
        .unwrap();
    assert_eq!(older_in_page(store, "0.9.0").await, ["0.1.0-beta"]);
}

fn store_versions(versions: &[&str]) -> Vec<semver::Version> {
    versions
        .iter()
        .filter_map(|v| semver::Version::parse(v).ok())
        .collect()
}

#[tokio::test]
async fn sqlite_compares_versions_by_semver_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("drover.db"))
        .await
        .unwrap();
    version_key_story(&store).await;
}

#[tokio::test]
async fn postgres_compares_versions_by_semver_precedence() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        version_key_story(&store).await;
    })
    .await;
}

/// A page of a rollout's agents is counted, placed in stages and paged in the database.
/// A dispatched task of rollout `r-1` from 1.0.0 to 2.0.0 in `wave`.
fn task(agent_id: &str, wave: usize) -> NewTask<'_> {
    NewTask {
        agent_id,
        from_version: "1.0.0",
        to_version: "2.0.0",
        os: "linux",
        arch: "amd64",
        kind: TaskKind::Update,
        status: TaskStatus::Dispatched,
        rollout_id: Some("r-1"),
        wave: Some(wave),
        mirror: None,
    }
}

/// Starts targeted rollout `id` of 2.0.0 on linux/amd64 over `targets` at `at_ms`.
async fn start_targeted(store: &dyn Store, id: &str, targets: &[(String, usize)], at_ms: i64) {
    let platforms = [("linux".to_owned(), "amd64".to_owned())];
    store
        .create_rollout(
            &NewRollout {
                id,
                version: "2.0.0",
                kind: RolloutKind::Targeted,
                platforms: &platforms,
                plan: "{}",
                started_by: "test",
                detail: "started",
                targets,
                supersedes: &[],
            },
            at_ms,
        )
        .await
        .unwrap();
}

async fn rollout_page_story(store: &dyn Store) {
    bootstrapped(store).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let agent = store
            .enroll(
                "enroll-hash",
                &facts(&format!("fp-{i}"), &format!("host-{i}"), "1.0.0"),
                &format!("secret-{i}"),
                1_000,
                NONE_LIVE,
            )
            .await
            .map(enrolled)
            .unwrap();
        ids.push(agent.agent_id);
    }
    ids.sort();
    // Waves: the first two agents in wave 0, the rest in wave 1.
    let targets: Vec<(String, usize)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), usize::from(i >= 2)))
        .collect();
    start_targeted(store, "r-1", &targets, 2_000).await;
    // ids[0]: downloading; ids[1]: failed its build, then a newer task was cancelled
    // (the build failure still says where it stands); ids[2]: succeeded; ids[3]: paused,
    // with no task; ids[4] and ids[5]: nothing yet.
    store.create_task(&task(&ids[0], 0), 3_000).await.unwrap();
    let failed = store.create_task(&task(&ids[1], 0), 3_000).await.unwrap();
    store
        .finish_task(
            &ids[1],
            &failed.id,
            TaskStatus::Failed,
            Some(FailureClass::Build),
            Some("boom"),
            3_500,
        )
        .await
        .unwrap();
    let again = store.create_task(&task(&ids[1], 0), 3_600).await.unwrap();
    store
        .finish_task(
            &ids[1],
            &again.id,
            TaskStatus::Cancelled,
            Some(FailureClass::Transient),
            None,
            3_700,
        )
        .await
        .unwrap();
    let done = store.create_task(&task(&ids[2], 1), 3_000).await.unwrap();
    store
        .finish_task(&ids[2], &done.id, TaskStatus::Succeeded, None, None, 3_800)
        .await
        .unwrap();
    store.set_paused(&ids[3], true).await.unwrap();

    let running = StageInputs {
        current_wave: 0,
        updates_enabled: true,
        closed_windows: Vec::new(),
    };
    let page =
        |stage: Option<&'static str>, wave: Option<usize>, limit: i64, offset: i64| TargetPage {
            wave,
            stage,
            inputs: running.clone(),
            limit,
            offset,
        };
    let stages = |targets: &[RolloutTarget]| -> Vec<(String, String)> {
        targets
            .iter()
            .map(|t| (t.agent_id.clone(), t.stage.clone()))
            .collect()
    };
    let (all, total) = store
        .rollout_targets_page("r-1", &page(None, None, 100, 0))
        .await
        .unwrap();
    assert_eq!(total, 6);
    let expected = [
        (ids[0].clone(), "downloading".to_owned()),
        (ids[1].clone(), "failed".to_owned()),
        (ids[2].clone(), "succeeded".to_owned()),
        (ids[3].clone(), "skipped".to_owned()),
        (ids[4].clone(), "waiting".to_owned()),
        (ids[5].clone(), "waiting".to_owned()),
    ];
    assert_eq!(stages(&all), expected);
    assert_eq!(all[1].error.as_deref(), Some("boom"));
    assert_eq!(all[1].task_id.as_deref(), Some(failed.id.as_str()));
    assert_eq!(all[1].class, Some(FailureClass::Build));
    assert_eq!(all[4].task_id, None);

    // Paged: the same order, the count before paging.
    let (some, total) = store
        .rollout_targets_page("r-1", &page(None, None, 2, 1))
        .await
        .unwrap();
    assert_eq!(total, 6);
    assert_eq!(stages(&some), &expected[1..3]);
    let (wave, total) = store
        .rollout_targets_page("r-1", &page(None, Some(1), 1, 1))
        .await
        .unwrap();
    assert_eq!(total, 4);
    assert_eq!(stages(&wave), &expected[3..4]);

    // By stage, counted over every target.
    let (waiting, total) = store
        .rollout_targets_page("r-1", &page(Some("waiting"), None, 1, 1))
        .await
        .unwrap();
    assert_eq!(total, 2);
    assert_eq!(stages(&waiting), &expected[5..6]);
    let (none, total) = store
        .rollout_targets_page("r-1", &page(Some("queued"), Some(0), 10, 0))
        .await
        .unwrap();
    assert_eq!((none.len(), total), (0, 0));

    // The next wave started, one target's window closed, updates off: the stage follows.
    let (started, _) = store
        .rollout_targets_page(
            "r-1",
            &TargetPage {
                wave: Some(1),
                stage: None,
                inputs: StageInputs {
                    current_wave: 1,
                    updates_enabled: true,
                    closed_windows: vec!["no such window".into()],
                },
                limit: 10,
                offset: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        stages(&started)[2..],
        [
            (ids[4].clone(), "queued".to_owned()),
            (ids[5].clone(), "queued".to_owned())
        ]
    );
    let (off, total) = store
        .rollout_targets_page(
            "r-1",
            &TargetPage {
                stage: Some("skipped"),
                inputs: StageInputs {
                    updates_enabled: false,
                    ..running.clone()
                },
                ..page(None, None, 10, 0)
            },
        )
        .await
        .unwrap();
    assert_eq!(total, 3, "{off:?}");

    // A task that ends moves its target at once: the target's task is kept with it.
    let downloading = store.active_task(&ids[0]).await.unwrap().unwrap();
    store
        .finish_task(
            &ids[0],
            &downloading.id,
            TaskStatus::Failed,
            Some(FailureClass::Transient),
            Some("network"),
            4_000,
        )
        .await
        .unwrap();
    let (first, _) = store
        .rollout_targets_page("r-1", &page(None, None, 1, 0))
        .await
        .unwrap();
    assert_eq!(stages(&first), [(ids[0].clone(), "queued".to_owned())]);
    assert_eq!(first[0].error.as_deref(), Some("network"));

    counted_groups_follow_every_change(store, &ids).await;
}

/// One counted group of `rollout_target_groups`: wave, channel, paused, auto-update,
/// task status and class, settled, window, and how many targets.
type Group = (
    usize,
    String,
    bool,
    bool,
    Option<TaskStatus>,
    Option<FailureClass>,
    bool,
    Option<String>,
    u64,
);

async fn groups(store: &dyn Store, settled_before: i64) -> Vec<Group> {
    let mut groups: Vec<Group> = store
        .rollout_target_groups(&["r-1", "no-such-rollout"], settled_before)
        .await
        .unwrap()
        .into_iter()
        .map(|(rollout, g)| {
            assert_eq!(rollout, "r-1");
            assert_eq!((g.os.as_str(), g.arch.as_str()), ("linux", "amd64"));
            (
                g.wave,
                g.channel,
                g.paused,
                g.auto_update,
                g.status,
                g.class,
                g.settled,
                g.window,
                g.agents,
            )
        })
        .collect();
    groups.sort_by_key(|g| format!("{g:?}"));
    groups
}

/// The counts read the facts each target keeps: a change of a task, an agent, its site
/// or its client shows in them at once.
async fn counted_groups_follow_every_change(store: &dyn Store, ids: &[String]) {
    use FailureClass::{Build, Transient};
    use TaskStatus::{Failed, Succeeded};
    let stable = || "stable".to_owned();
    let mut expected: Vec<Group> = vec![
        (
            0,
            stable(),
            false,
            true,
            Some(Failed),
            Some(Transient),
            false,
            None,
            1,
        ),
        (
            0,
            stable(),
            false,
            true,
            Some(Failed),
            Some(Build),
            false,
            None,
            1,
        ),
        (
            1,
            stable(),
            false,
            true,
            Some(Succeeded),
            None,
            false,
            None,
            1,
        ),
        (1, stable(), true, true, None, None, false, None, 1),
        (1, stable(), false, true, None, None, false, None, 2),
    ];
    expected.sort_by_key(|g| format!("{g:?}"));
    assert_eq!(groups(store, i64::MAX).await, expected);

    // Settled: succeeded, and connected since before the cutoff.
    store.node_beat("n-1", "10.0.0.1:1", 3_900).await.unwrap();
    store
        .record_sessions("n-1", &[claim(&ids[2], 3_900)])
        .await
        .unwrap();
    let settled = groups(store, 5_000).await;
    assert!(
        settled.contains(&(
            1,
            stable(),
            false,
            true,
            Some(Succeeded),
            None,
            true,
            None,
            1
        )),
        "{settled:?}"
    );
    assert!(
        !groups(store, 3_850).await.iter().any(|g| g.6),
        "not yet connected that long"
    );

    // The site moves to beta, its client gets a window; an agent's own channel and its
    // pause win over them; the paused agent resumes.
    let site = store.agent(&ids[0]).await.unwrap().site_id;
    let client = store
        .list_sites()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id == site)
        .unwrap()
        .client_id;
    store
        .set_channel(ChannelScope::Site, &site, Some("beta"))
        .await
        .unwrap();
    let window = r#"{"days":["sat"],"start":"02:00","duration":"2h","time_zone":"UTC"}"#;
    store
        .set_hierarchy_setting(
            ChannelScope::Client,
            &client,
            HierarchySetting::MaintenanceWindow,
            Some(window),
        )
        .await
        .unwrap();
    store
        .set_channel(ChannelScope::Agent, &ids[4], Some("stable"))
        .await
        .unwrap();
    store.set_paused(&ids[3], false).await.unwrap();
    let beta = || "beta".to_owned();
    let win = || Some(window.to_owned());
    let mut expected: Vec<Group> = vec![
        (
            0,
            beta(),
            false,
            true,
            Some(Failed),
            Some(Transient),
            false,
            win(),
            1,
        ),
        (
            0,
            beta(),
            false,
            true,
            Some(Failed),
            Some(Build),
            false,
            win(),
            1,
        ),
        (
            1,
            beta(),
            false,
            true,
            Some(Succeeded),
            None,
            true,
            win(),
            1,
        ),
        (1, beta(), false, true, None, None, false, win(), 2),
        (1, stable(), false, true, None, None, false, win(), 1),
    ];
    expected.sort_by_key(|g| format!("{g:?}"));
    assert_eq!(groups(store, 5_000).await, expected);

    // The client's channel shows once the site no longer sets one; a new task shows.
    store
        .set_channel(ChannelScope::Site, &site, None)
        .await
        .unwrap();
    store
        .set_channel(ChannelScope::Client, &client, Some("beta"))
        .await
        .unwrap();
    store.create_task(&task(&ids[5], 1), 6_000).await.unwrap();
    let now = groups(store, 5_000).await;
    assert!(
        now.contains(&(
            1,
            beta(),
            false,
            true,
            Some(TaskStatus::Dispatched),
            None,
            false,
            win(),
            1
        )),
        "{now:?}"
    );
    assert!(
        now.contains(&(1, beta(), false, true, None, None, false, win(), 1)),
        "{now:?}"
    );
    assert_eq!(now.iter().map(|g| g.8).sum::<u64>(), 6, "{now:?}");

    // An agent that joins the rollout after its task was made starts out with its
    // facts and its task; joining twice changes nothing.
    let late = enroll_one(store, "fp-late", "late", 6_500).await;
    store.create_task(&task(&late, 1), 6_600).await.unwrap();
    for _ in 0..2 {
        store.add_rollout_target("r-1", &late, 1).await.unwrap();
        let joined = groups(store, 5_000).await;
        assert!(
            joined.contains(&(
                1,
                beta(),
                false,
                true,
                Some(TaskStatus::Dispatched),
                None,
                false,
                win(),
                2
            )),
            "{joined:?}"
        );
        assert_eq!(joined.iter().map(|g| g.8).sum::<u64>(), 7, "{joined:?}");
    }
}

#[tokio::test]
async fn sqlite_pages_a_rollouts_agents_by_stage() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("drover.db"))
        .await
        .unwrap();
    rollout_page_story(&store).await;
}

#[tokio::test]
async fn postgres_pages_a_rollouts_agents_by_stage() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        rollout_page_story(&store).await;
    })
    .await;
}

/// More targets than one insert statement holds (`TARGETS_PER_STATEMENT`, 10,000 rows of
/// 3 parameters), and more than SQLite takes in one (32,766 parameters): a statement of
/// more rows than that limit allows fails here, however the targets are split.
const MANY_TARGETS: usize = 25_000;

/// Adds `MANY_TARGETS` agents to the default site in one statement, which both backends
/// read alike.
fn insert_many_agents() -> String {
    format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {MANY_TARGETS}) \
         INSERT INTO agents (id, site_id, fingerprint, secret_hash, hostname, version, os, \
             arch, enrolled_at, last_seen) \
         SELECT 'many-' || i, (SELECT site_id FROM agents LIMIT 1), 'fp-many-' || i, 'x', \
             'many-' || i, '1.0.0', 'linux', 'amd64', 0, 0 FROM n"
    )
}

/// A rollout of more targets than one statement holds starts with every one of them, in
/// its wave, on either backend: its statements stay within the backend's limit of
/// parameters. `insert_agents` adds the `MANY_TARGETS` agents (`insert_many_agents`).
async fn many_targets_story<F, Fut>(store: &dyn Store, insert_agents: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    // The default site exists once an agent enrolled.
    bootstrapped(store).await;
    enroll_one(store, "fp-first", "first", 1_000).await;
    insert_agents().await;
    let targets: Vec<(String, usize)> = (1..=MANY_TARGETS)
        .map(|i| (format!("many-{i}"), usize::from(i % 2 == 0)))
        .collect();
    start_targeted(store, "r-many", &targets, 2_000).await;
    let (_, book) = store.rollout_book(None).await.unwrap();
    let mut written: Vec<(String, usize)> = book
        .into_iter()
        .filter(|(rollout, _, _)| rollout == "r-many")
        .map(|(_, agent, wave)| (agent, wave))
        .collect();
    written.sort();
    let mut expected = targets.clone();
    expected.sort();
    assert_eq!(written.len(), MANY_TARGETS);
    assert!(written == expected, "every target once, in its wave");
}

#[tokio::test]
async fn sqlite_starts_a_rollout_of_more_targets_than_one_statement_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let store = SqliteStore::open(&path).await.unwrap();
    many_targets_story(&store, || async {
        let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(&insert_many_agents())
            .execute(&mut raw)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn postgres_starts_a_rollout_of_more_targets_than_one_statement_holds() {
    with_postgres(|url| async move {
        let store = PostgresStore::open(&url).await.unwrap();
        many_targets_story(&store, || async {
            let mut raw = PgConnection::connect(&url).await.unwrap();
            sqlx::query(&insert_many_agents())
                .execute(&mut raw)
                .await
                .unwrap();
        })
        .await;
    })
    .await;
}

/// Transactions that read before they write, run side by side on SQLite, wait for each
/// other rather than failing with "database is locked" when another committed first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_transactions_that_read_then_write_wait_for_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        SqliteStore::open(&dir.path().join("drover.db"))
            .await
            .unwrap(),
    );
    let client = store.create_client("side by side").await.unwrap();
    let writers: Vec<_> = (0..64)
        .map(|i| {
            let (store, client) = (store.clone(), client.id.clone());
            // Each reads its client first, then adds a site.
            tokio::spawn(async move { store.create_site(&client, &format!("site {i}")).await })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().expect("every site is added");
    }
    assert_eq!(store.list_sites().await.unwrap().len(), 64);
}
