//! The storage story: the whole `Store` trait exercised in the order the product uses it,
//! against a real SQLite file.

use server::store::{AgentFacts, Bootstrap, HeartbeatRecord, Role, SqliteStore, Store, StoreError};

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
        store.api_token_role("admin-hash").await.unwrap(),
        Role::Admin
    );
    assert!(matches!(
        store.api_token_role("other-admin").await,
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
    assert_eq!(reopened.list_agents().await.unwrap().len(), 2);
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
