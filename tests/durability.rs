//! End-to-end: a disk that fills up during an update fails it cleanly. The error reaches
//! the server, the installed agent keeps running its old version and stays connected,
//! and nothing is left behind to keep the disk full.
//!
//! The small disk is a real tmpfs mounted for the test, which needs root (or
//! CAP_SYS_ADMIN). Where that is impossible the tests say why and skip, except under
//! `CI=true`, where they fail instead.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

const MIB: u64 = 1024 * 1024;

/// A tmpfs of a given size, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` at `path`. `None`, with the reason printed, where this
    /// machine cannot; a panic instead under `CI=true`, where tests never skip.
    fn mount(path: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        let why = match mounted {
            Ok(output) if output.status.success() => {
                return Some(SmallDisk {
                    path: path.to_owned(),
                });
            }
            Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            Err(err) => format!("mount: {err}"),
        };
        let reason = format!(
            "cannot mount a small tmpfs at {} ({why}); the full-disk tests need root or CAP_SYS_ADMIN",
            path.display()
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{reason}");
        }
        eprintln!("skipping: {reason}");
        None
    }

    /// Free bytes, as the agent's own free-space check sees them.
    fn available(&self) -> u64 {
        let output = Command::new("df")
            .args(["--block-size=1", "--output=avail"])
            .arg(&self.path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .nth(1)
            .and_then(|line| line.trim().parse().ok())
            .unwrap_or_else(|| panic!("df answered {text:?}"))
    }

    /// Writes a file of about `bytes` (fewer when the disk fills first).
    fn fill(&self, name: &str, bytes: u64) {
        let mut file = std::fs::File::create(self.path.join(name)).unwrap();
        let chunk = vec![0u8; MIB as usize];
        let mut written = 0;
        while written < bytes {
            let take = (bytes - written).min(MIB) as usize;
            if file.write_all(&chunk[..take]).is_err() {
                break;
            }
            written += take as u64;
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a process that still has a file open there must not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// After a failed update: still connected, still reporting the old version.
async fn still_running_the_old_version(server: &Server, name: &str) {
    eventually(&format!("{name} online on 1.0.0"), UPDATE_WAIT, || async {
        let agent = agent_view(server, name).await?;
        (agent["online"] == true && agent["version"] == "1.0.0").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_fills_up_during_the_download_fails_the_update_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let build = dir.path().join("build-1.1.0");
    stamp_agent("1.1.0", &build);
    let size = std::fs::metadata(&build).unwrap().len();
    // The agent's state directory is the small disk, roomy enough for the agent's check
    // before downloading (the build twice, plus its margin), which therefore passes.
    let agents = dir.path().join("agents");
    let Some(disk) = SmallDisk::mount(&agents.join("oscar"), 2 * size + 32 * MIB) else {
        return;
    };
    // Downloads go through a slow link (about 8 s for the build), so the disk can fill
    // up while the build is arriving.
    let cdn = Cdn::start(CdnMode::Throttle {
        bytes_per_sec: size / 8,
    })
    .await;
    let server = Server::start_with_args(dir.path(), &["--public-url", &cdn.url]);
    cdn.forward_to(&server.url);
    let exe = dir.path().join("bin/drover-agent");
    stamp_agent("1.0.0", &exe);
    let agent = Agent::start_installed(
        &server,
        &exe,
        &agents,
        "oscar",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-oscar"],
    );
    assert_eq!(agent.state_dir, disk.path);
    let id = enrolled_id(&server, "oscar").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        &std::fs::read(&build).unwrap(),
    );

    eventually("the download to be under way", UPDATE_WAIT, || async {
        let served = cdn.served();
        (served.first()?.bytes > 0).then_some(())
    })
    .await;
    // Something else on the machine takes all but 1 MiB of the disk.
    disk.fill("filler", disk.available().saturating_sub(MIB));

    let task = task_reaches(&server, &id, "failed").await;
    let error = task["error"].as_str().unwrap();
    // The write-time failure, not the free-space check before downloading.
    assert!(error.contains("No space left on device"), "{task}");
    assert!(error.contains("disk filled up while downloading"), "{task}");
    assert!(!error.contains("bytes needed"), "{task}");

    assert_eq!(
        version_of(&exe),
        "1.0.0",
        "the installed binary is untouched"
    );
    assert_eq!(names_in(&dir.path().join("bin")), ["drover-agent"]);
    assert!(
        !agent.state_dir.join("staging").exists(),
        "the partial download is removed"
    );
    std::fs::remove_file(disk.path.join("filler")).unwrap();
    assert!(
        disk.available() > 2 * size,
        "nothing is left filling the disk: {} bytes free of {}",
        disk.available(),
        2 * size + 32 * MIB
    );
    still_running_the_old_version(&server, "oscar").await;
    eventually(
        "the journal to be cleared",
        Duration::from_secs(10),
        || async { (!agent.state_dir.join("update.json").exists()).then_some(()) },
    )
    .await;
    assert!(
        agent.state_dir.join("identity.json").exists(),
        "the identity survives"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_fills_up_while_staging_the_new_binary_fails_the_update_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let build = dir.path().join("build-1.1.0");
    stamp_agent("1.1.0", &build);
    let size = std::fs::metadata(&build).unwrap().len();
    // The executable lives on a small disk with room for itself and half a build more;
    // the state directory (and the download) is on the roomy one, so the download and
    // its free-space check succeed and the copy next to the executable runs out.
    let bin = dir.path().join("bin");
    let Some(disk) = SmallDisk::mount(&bin, size + size / 2) else {
        return;
    };
    let server = Server::start(dir.path());
    let exe = bin.join("drover-agent");
    stamp_agent("1.0.0", &exe);
    let agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "papa",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-papa"],
    );
    let id = enrolled_id(&server, "papa").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        &std::fs::read(&build).unwrap(),
    );

    let task = task_reaches(&server, &id, "failed").await;
    let error = task["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{task}");
    assert!(error.contains("install failed"), "{task}");

    assert_eq!(
        version_of(&exe),
        "1.0.0",
        "the installed binary is untouched"
    );
    assert_eq!(
        names_in(&bin),
        ["drover-agent"],
        "the half-written copy is removed"
    );
    assert!(
        disk.available() >= size / 2 - MIB,
        "nothing is left filling the disk: {} bytes free",
        disk.available()
    );
    assert!(
        !agent.state_dir.join("staging").exists(),
        "the staging area is clean"
    );
    still_running_the_old_version(&server, "papa").await;
}
