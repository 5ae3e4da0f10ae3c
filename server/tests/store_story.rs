//! The storage story: the whole `Store` trait exercised in the order the product uses it,
//! against a real SQLite file.

use server::store::{
    AgentFacts, AuditEntry, Bootstrap, HeartbeatRecord, Role, SqliteStore, Store, StoreError,
};

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

async fn story(store: &dyn Store) {
    // First start creates what is missing, once.
    let state = store.bootstrap_state().await.unwrap();
    assert!(!state.has_admin_token && !state.has_enroll_token);
    let pieces = Bootstrap {
        admin_token_hash: Some("admin-hash".into()),
        enroll_token_hash: Some("enroll-hash".into()),
    };
    let first = store.bootstrap(&pieces).await.unwrap();
    assert!(first.created_site && first.created_admin_token && first.created_enroll_token);
    let again = store
        .bootstrap(&Bootstrap {
            admin_token_hash: Some("other-admin".into()),
            enroll_token_hash: Some("other-enroll".into()),
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
            .enroll("nope", &facts("fp-1", "one", "1.0.0"), "s", 1)
            .await,
        Err(StoreError::NotFound)
    ));
    let one = store
        .enroll(
            "enroll-hash",
            &facts("fp-1", "one", "1.0.0"),
            "secret-1",
            1_000,
        )
        .await
        .unwrap();
    assert!(!one.rebound);
    let two = store
        .enroll(
            "enroll-hash",
            &facts("fp-2", "two", "1.0.0"),
            "secret-2",
            1_000,
        )
        .await
        .unwrap();
    assert_ne!(one.agent_id, two.agent_id);
    let again = store
        .enroll(
            "enroll-hash",
            &facts("fp-1", "one-renamed", "1.0.1"),
            "secret-1b",
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(again.agent_id, one.agent_id);
    assert!(again.rebound);

    // Authentication uses the newest secret only, and records the hello's facts.
    let hello = facts("fp-1", "one-again", "1.1.0");
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
        ("one-again", "1.1.0", 3_000)
    );

    // Heartbeats in a batch; last_seen never moves backwards.
    store
        .record_heartbeats(&[
            HeartbeatRecord {
                agent_id: one.agent_id.clone(),
                version: "1.2.0".into(),
                at_ms: 5_000,
            },
            HeartbeatRecord {
                agent_id: two.agent_id.clone(),
                version: "1.0.0".into(),
                at_ms: 500,
            },
        ])
        .await
        .unwrap();
    let agents = store.list_agents().await.unwrap();
    assert_eq!(agents.len(), 2);
    let by_id = |id: &str| agents.iter().find(|a| a.id == id).unwrap().clone();
    assert_eq!(by_id(&one.agent_id).version, "1.2.0");
    assert_eq!(by_id(&one.agent_id).last_seen_ms, 5_000);
    assert_eq!(by_id(&two.agent_id).last_seen_ms, 1_000);
    assert_eq!(by_id(&two.agent_id).site_id, by_id(&one.agent_id).site_id);
    assert!(matches!(
        store.agent("missing").await,
        Err(StoreError::NotFound)
    ));
    story_of_operators(store, &by_id(&one.agent_id).site_id).await;
}

/// Tokens, enrollment limits, rollout records, blocks and the audit log.
async fn story_of_operators(store: &dyn Store, site: &str) {
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
        .enroll("once", &facts("fp-3", "three", "1.0.0"), "s3", 1_000)
        .await
        .unwrap();
    assert!(matches!(
        store
            .enroll("once", &facts("fp-4", "four", "1.0.0"), "s4", 1_000)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .enroll("expired", &facts("fp-5", "five", "1.0.0"), "s5", 1_000)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .create_enrollment_token("no-site", "x", None, None)
            .await,
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
    assert!(
        store
            .halt("1.2.0", "linux", "amd64", "too many failures", 200)
            .await
            .unwrap()
    );
    assert!(
        !store
            .halt("1.2.0", "linux", "amd64", "again", 300)
            .await
            .unwrap()
    );
    let records = store.rollout_records().await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].first_seen_ms, records[0].halt_reason.as_deref()),
        (100, Some("too many failures"))
    );
    assert_eq!(
        store
            .resume("1.2.0", Some(("linux", "arm64")))
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.resume("1.2.0", None).await.unwrap(), 1);
    store.block_version("1.2.0", "bad", 1).await.unwrap();
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
    assert_eq!(reopened.list_agents().await.unwrap().len(), 3);
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
