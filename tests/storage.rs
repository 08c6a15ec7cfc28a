//! File storage: one conformance suite run against the local backend and against a real S3
//! server (s3s-fs, which checks signatures for real) on loopback; then the access rules, path
//! rules, signed links over real HTTP, and the admin router with `crew files` over loopback.

#[path = "support/s3.rs"]
mod s3s_fs;
#[path = "support/tools.rs"]
mod tools;

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use matrix_crew::storage::access::{
    self, Access, AgentScope, Operation, Role, TaskFile, agent_path, shared_path, task_file,
    task_path,
};
use matrix_crew::storage::links::{FileReference, Links, links_router};
use matrix_crew::storage::{
    Backend, BackendKind, BodyStream, LocalBackend, S3Backend, Storage, StorageConfig,
    StorageError, StoragePath, StoragePrefix,
};
use s3s_fs::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY, s3_config, s3_env, start_s3};
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Fixtures: a local directory or a running s3s-fs.

/// Either backend, able to hand out `Storage` handles with different size limits.
enum Fixture {
    Local(tempfile::TempDir),
    S3(S3Server),
}

impl Fixture {
    async fn local() -> Self {
        Fixture::Local(tempfile::tempdir().expect("temp dir"))
    }

    async fn s3() -> Self {
        Fixture::S3(start_s3().await)
    }

    async fn storage_with_limit(&self, limit: u64) -> Storage {
        let backend = match self {
            Fixture::Local(dir) => Backend::Local(
                LocalBackend::open(&dir.path().join("files"))
                    .await
                    .expect("open local backend"),
            ),
            Fixture::S3(server) => Backend::S3(
                S3Backend::connect(&s3_config(&server.endpoint, BUCKET), s3_env(SECRET_KEY))
                    .expect("connect to s3s-fs"),
            ),
        };
        let storage = Storage::new(backend, limit);
        storage.check().await.expect("backend is usable");
        storage
    }

    async fn storage(&self) -> Storage {
        self.storage_with_limit(1 << 30).await
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn path(raw: &str) -> StoragePath {
    StoragePath::parse(raw).expect("valid test path")
}

fn prefix(raw: &str) -> StoragePrefix {
    StoragePrefix::parse(raw).expect("valid test prefix")
}

/// A deterministic pseudo-random body of `total` bytes in `chunk`-sized pieces, generated as
/// it is read (never held whole).
fn generated(total: usize, chunk: usize, seed: u64) -> BodyStream {
    let state = (seed | 1, total);
    Box::pin(futures::stream::unfold(
        state,
        move |(mut x, remaining)| async move {
            if remaining == 0 {
                return None;
            }
            let n = remaining.min(chunk);
            let mut buf = Vec::with_capacity(n + 8);
            while buf.len() < n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.extend_from_slice(&x.to_le_bytes());
            }
            buf.truncate(n);
            Some((Ok(Bytes::from(buf)), (x, remaining - n)))
        },
    ))
}

async fn hash_stream(mut body: BodyStream) -> ([u8; 32], u64, usize) {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut largest_chunk = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("body chunk");
        largest_chunk = largest_chunk.max(chunk.len());
        total += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (hasher.finalize().into(), total, largest_chunk)
}

async fn read_all(storage: &Storage, at: &StoragePath) -> Vec<u8> {
    storage
        .get_bytes(at, 512 * MIB as u64)
        .await
        .expect("read file")
        .to_vec()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// The conformance suite: every function runs against both backends.

mod suite {
    use super::*;

    pub async fn put_get_head_list_delete(fixture: Fixture) {
        let storage = fixture.storage().await;
        let at = path("tasks/7/plan.md");
        let meta = storage
            .put_bytes(&at, "# Plan\n1. do it\n")
            .await
            .expect("put");
        assert_eq!(meta.path, "tasks/7/plan.md");
        assert_eq!(meta.size, 16);
        assert_eq!(read_all(&storage, &at).await, b"# Plan\n1. do it\n");

        let head = storage.head(&at).await.expect("head");
        assert_eq!(head.size, 16);
        assert_eq!(head.content_type, "text/markdown; charset=utf-8");
        assert!(
            head.modified_unix.abs_diff(now_unix()) < 300,
            "modified time {} is not near now",
            head.modified_unix
        );
        let object = storage.get(&at).await.expect("get");
        assert_eq!(object.meta.size, 16);
        assert_eq!(object.meta.content_type, head.content_type);

        let listed = storage.list(&prefix("")).await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, "tasks/7/plan.md");
        assert_eq!(listed[0].size, 16);

        storage.put_bytes(&at, "replaced").await.expect("overwrite");
        assert_eq!(read_all(&storage, &at).await, b"replaced");

        storage.delete(&at).await.expect("delete");
        assert!(matches!(
            storage.get(&at).await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(storage.list(&prefix("")).await.expect("list").is_empty());
        storage.delete(&at).await.expect("deleting again succeeds");
    }

    pub async fn missing_keys_are_not_found(fixture: Fixture) {
        let storage = fixture.storage().await;
        let at = path("shared/nothing-here.txt");
        for error in [
            storage.get(&at).await.map(drop).expect_err("get"),
            storage.head(&at).await.map(drop).expect_err("head"),
            storage
                .get_bytes(&at, 10)
                .await
                .map(drop)
                .expect_err("bytes"),
        ] {
            assert!(
                matches!(&error, StorageError::NotFound { path } if path == "shared/nothing-here.txt"),
                "{error:?}"
            );
            assert_eq!(error.to_string(), "no file at `shared/nothing-here.txt`");
        }
    }

    pub async fn prefixes_select_like_s3(fixture: Fixture) {
        let storage = fixture.storage().await;
        for key in [
            "tasks/4/spec.md",
            "tasks/4/out/data.csv",
            "tasks/42/spec.md",
            "tasks/5/spec.md",
            "shared/notes.md",
            "agents/ann/memory.md",
        ] {
            storage
                .put_bytes(&path(key), key.to_owned())
                .await
                .expect("put");
        }
        let names = |listed: Vec<matrix_crew::storage::ObjectMeta>| {
            listed.into_iter().map(|meta| meta.path).collect::<Vec<_>>()
        };
        assert_eq!(
            names(storage.list(&prefix("tasks/4/")).await.expect("list")),
            ["tasks/4/out/data.csv", "tasks/4/spec.md"]
        );
        assert_eq!(
            names(storage.list(&prefix("tasks/4")).await.expect("list")),
            [
                "tasks/4/out/data.csv",
                "tasks/4/spec.md",
                "tasks/42/spec.md"
            ]
        );
        assert_eq!(
            names(storage.list(&prefix("tasks/4/out/d")).await.expect("list")),
            ["tasks/4/out/data.csv"]
        );
        assert_eq!(storage.list(&prefix("")).await.expect("list").len(), 6);
        assert!(
            storage
                .list(&prefix("nothing/"))
                .await
                .expect("list")
                .is_empty()
        );
        let csv = storage.list(&prefix("tasks/4/out/")).await.expect("list");
        assert_eq!(csv[0].content_type, "text/csv; charset=utf-8");
        assert_eq!(csv[0].size, "tasks/4/out/data.csv".len() as u64);
    }

    pub async fn large_files_stream(fixture: Fixture) {
        let storage = fixture.storage().await;
        let at = path("tasks/9/dataset.bin");
        // 60 MiB in chunks of an odd size, so part and buffer boundaries fall mid-chunk.
        let total = 60 * MIB + 12_345;
        let (expected, _, _) = hash_stream(generated(total, 100_003, 9)).await;
        let meta = storage
            .put(&at, generated(total, 100_003, 9))
            .await
            .expect("put large");
        assert_eq!(meta.size, total as u64);
        assert_eq!(storage.head(&at).await.expect("head").size, total as u64);
        let object = storage.get(&at).await.expect("get large");
        assert_eq!(object.meta.size, total as u64);
        let (actual, read, largest_chunk) = hash_stream(object.body).await;
        assert_eq!(read, total as u64);
        assert_eq!(actual, expected, "the file read back differs");
        assert!(
            largest_chunk <= 8 * MIB,
            "reads arrive in chunks, not whole ({largest_chunk} bytes at once)"
        );
    }

    pub async fn concurrent_writers(fixture: Fixture) {
        let storage = fixture.storage().await;
        let mut writers = Vec::new();
        for i in 0..12u8 {
            let storage = storage.clone();
            writers.push(tokio::spawn(async move {
                let own = path(&format!("agents/w{i}/out.bin"));
                storage
                    .put_bytes(&own, vec![i; 200_000])
                    .await
                    .expect("own write");
                // Everyone also writes the same file with a body of its own byte.
                storage
                    .put(&path("shared/contended.bin"), generated_fill(i, 3 * MIB))
                    .await
                    .expect("contended write");
            }));
        }
        for writer in writers {
            writer.await.expect("writer task");
        }
        for i in 0..12u8 {
            let body = read_all(&storage, &path(&format!("agents/w{i}/out.bin"))).await;
            assert_eq!(body.len(), 200_000);
            assert!(
                body.iter().all(|&b| b == i),
                "writer {i}'s file was mixed up"
            );
        }
        let contended = read_all(&storage, &path("shared/contended.bin")).await;
        assert_eq!(contended.len(), 3 * MIB);
        let winner = contended[0];
        assert!(winner < 12);
        assert!(
            contended.iter().all(|&b| b == winner),
            "concurrent writes interleaved"
        );
        assert_eq!(storage.list(&prefix("")).await.expect("list").len(), 13);
    }

    /// `total` bytes of `byte`, in 64 KiB chunks with a yield between, so writers overlap.
    fn generated_fill(byte: u8, total: usize) -> BodyStream {
        Box::pin(futures::stream::unfold(
            total,
            move |remaining| async move {
                if remaining == 0 {
                    return None;
                }
                tokio::task::yield_now().await;
                let n = remaining.min(64 * 1024);
                Some((Ok(Bytes::from(vec![byte; n])), remaining - n))
            },
        ))
    }

    pub async fn size_limit_stores_nothing(fixture: Fixture) {
        // A small limit (one request) and one past the S3 part size (multipart, then aborted).
        for limit in [MIB, 9 * MIB] {
            let storage = fixture.storage_with_limit(limit as u64).await;
            let at = path("shared/big.bin");
            let error = storage
                .put(&at, generated(limit + 1, 65_536, 1))
                .await
                .expect_err("one byte over the limit");
            assert!(
                matches!(&error, StorageError::TooLarge { limit: l, .. } if *l == limit as u64),
                "{error:?}"
            );
            assert!(error.to_string().contains("storage.max_file_bytes"));
            assert!(matches!(
                storage.head(&at).await,
                Err(StorageError::NotFound { .. })
            ));
            let meta = storage
                .put(&at, generated(limit, 65_536, 1))
                .await
                .expect("exactly the limit");
            assert_eq!(meta.size, limit as u64);
            storage.delete(&at).await.expect("clean up");
        }
    }

    pub async fn failing_bodies_store_nothing(fixture: Fixture) {
        let storage = fixture.storage().await;
        let at = path("shared/broken.txt");
        let body: BodyStream = Box::pin(futures::stream::iter([
            Ok(Bytes::from_static(b"first part")),
            Err(std::io::Error::other("client went away")),
        ]));
        let error = storage.put(&at, body).await.expect_err("broken body");
        assert!(matches!(error, StorageError::Body { .. }), "{error:?}");
        assert!(error.to_string().contains("client went away"));
        assert!(matches!(
            storage.head(&at).await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(storage.list(&prefix("")).await.expect("list").is_empty());
    }

    pub async fn empty_files_and_unusual_names(fixture: Fixture) {
        let storage = fixture.storage().await;
        let empty = path("shared/empty.txt");
        assert_eq!(storage.put_bytes(&empty, "").await.expect("put").size, 0);
        assert_eq!(read_all(&storage, &empty).await, b"");
        let odd = path("shared/ünïcode name (1) & more+%.md");
        storage.put_bytes(&odd, "odd").await.expect("put odd name");
        assert_eq!(read_all(&storage, &odd).await, b"odd");
        let listed = storage.list(&prefix("shared/")).await.expect("list");
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().any(|meta| meta.path == odd.as_str()));
    }
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn put_get_head_list_delete() {
                suite::put_get_head_list_delete(Fixture::$backend().await).await;
            }

            #[tokio::test]
            async fn missing_keys_are_not_found() {
                suite::missing_keys_are_not_found(Fixture::$backend().await).await;
            }

            #[tokio::test]
            async fn prefixes_select_like_s3() {
                suite::prefixes_select_like_s3(Fixture::$backend().await).await;
            }

            #[tokio::test]
            async fn large_files_stream() {
                suite::large_files_stream(Fixture::$backend().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_writers() {
                suite::concurrent_writers(Fixture::$backend().await).await;
            }

            #[tokio::test]
            async fn size_limit_stores_nothing() {
                suite::size_limit_stores_nothing(Fixture::$backend().await).await;
            }

            #[tokio::test]
            async fn failing_bodies_store_nothing() {
                suite::failing_bodies_store_nothing(Fixture::$backend().await).await;
            }

            #[tokio::test]
            async fn empty_files_and_unusual_names() {
                suite::empty_files_and_unusual_names(Fixture::$backend().await).await;
            }
        }
    };
}

conformance!(local);
conformance!(s3);

// ---------------------------------------------------------------------------------------------
// Errors a user sees when the S3 side is misconfigured.

#[tokio::test]
async fn s3_missing_bucket_says_so() {
    let server = start_s3().await;
    let config = StorageConfig {
        backend: BackendKind::S3,
        s3: s3_config(&server.endpoint, "no-such-bucket"),
        ..StorageConfig::default()
    };
    let error = Storage::open(&config, Path::new("/nonexistent"), s3_env(SECRET_KEY))
        .await
        .expect_err("bucket is missing");
    assert!(
        matches!(&error, StorageError::BucketMissing { bucket, .. } if bucket == "no-such-bucket"),
        "{error:?}"
    );
    assert!(error.to_string().contains("storage.s3.bucket"), "{error}");

    // Listing on a backend that skipped the check fails the same way. (Object reads and writes
    // are not asserted: s3s-fs answers NoSuchKey for a missing bucket and creates the bucket
    // folder on PutObject, where MinIO and AWS answer NoSuchBucket.)
    let backend = S3Backend::connect(&config.s3, s3_env(SECRET_KEY)).expect("client");
    let storage = Storage::new(Backend::S3(backend), 1 << 20);
    let error = storage.list(&prefix("")).await.map(drop).expect_err("list");
    assert!(
        matches!(error, StorageError::BucketMissing { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn s3_wrong_credentials_say_so_without_leaking_the_secret() {
    let server = start_s3().await;
    let config = StorageConfig {
        backend: BackendKind::S3,
        s3: s3_config(&server.endpoint, BUCKET),
        ..StorageConfig::default()
    };
    const WRONG: &str = "definitely-the-wrong-secret-91";
    let error = Storage::open(&config, Path::new("/nonexistent"), s3_env(WRONG))
        .await
        .expect_err("wrong secret");
    assert!(
        matches!(error, StorageError::Credentials { .. }),
        "{error:?}"
    );
    let text = format!("{error} {error:?}");
    assert!(text.contains("TEST_S3_SK"), "names the variable: {text}");
    assert!(!text.contains(WRONG), "leaks the secret: {text}");
    assert!(!text.contains(SECRET_KEY), "leaks the secret: {text}");

    let backend = S3Backend::connect(&config.s3, s3_env(WRONG)).expect("client");
    let storage = Storage::new(Backend::S3(backend), 1 << 20);
    let error = storage
        .put_bytes(&path("a.txt"), "x")
        .await
        .expect_err("put with the wrong secret");
    assert!(
        matches!(error, StorageError::Credentials { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn s3_missing_credentials_and_bucket_name_are_config_errors() {
    let config = s3_config("http://127.0.0.1:9", BUCKET);
    let error = S3Backend::connect(&config, |_| None).expect_err("no credentials");
    assert!(
        error
            .to_string()
            .contains("$TEST_S3_AK or $TEST_S3_AK_FILE"),
        "{error}"
    );
    let error = S3Backend::connect(&s3_config("http://127.0.0.1:9", ""), s3_env(SECRET_KEY))
        .expect_err("no bucket");
    assert!(error.to_string().contains("storage.s3.bucket"), "{error}");

    // Credentials may come from files named by <NAME>_FILE.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sk");
    std::fs::write(&file, format!("{SECRET_KEY}\n")).expect("write secret file");
    let server = start_s3().await;
    let file = file.display().to_string();
    let env = move |name: &str| match name {
        "TEST_S3_AK" => Some(ACCESS_KEY.to_owned()),
        "TEST_S3_SK_FILE" => Some(file.clone()),
        _ => None,
    };
    let backend = S3Backend::connect(&s3_config(&server.endpoint, BUCKET), env).expect("client");
    backend.check().await.expect("secret from file works");
}

// ---------------------------------------------------------------------------------------------
// Local backend specifics.

#[tokio::test]
async fn local_default_lives_under_the_data_dir() {
    let data = tempfile::tempdir().expect("temp dir");
    let storage = Storage::open(&StorageConfig::default(), data.path(), |_| None)
        .await
        .expect("open default");
    storage
        .put_bytes(&path("shared/a.md"), "a")
        .await
        .expect("put");
    assert!(data.path().join("files/shared/a.md").is_file());
    assert!(storage.describe().contains("files"));

    // A path whose folder is a file is refused clearly, not with an OS error.
    let error = storage
        .put_bytes(&path("shared/a.md/inner.txt"), "x")
        .await
        .expect_err("folder is a file");
    assert!(
        matches!(error, StorageError::InvalidPath { .. }),
        "{error:?}"
    );
    // Deleting the last file of a folder removes the empty folder.
    storage.delete(&path("shared/a.md")).await.expect("delete");
    assert!(!data.path().join("files/shared").exists());
}

// ---------------------------------------------------------------------------------------------
// Paths and access rules.

#[test]
fn paths_are_normalised_or_refused_with_a_reason() {
    for (raw, reason) in [
        ("../etc/passwd", "`..`"),
        ("tasks/../../x", "`..`"),
        ("/abs/path", "absolute"),
        ("a\u{0}b", "U+0000"),
        ("a\u{1b}[31mred", "U+001B"),
        ("tasks//x", "empty path segment"),
        ("tasks/x/", "empty path segment"),
        ("", "empty"),
        ("a\\..\\b", "backslash"),
    ] {
        let error = StoragePath::parse(raw).expect_err(raw);
        assert!(matches!(error, StorageError::InvalidPath { .. }));
        let text = error.to_string();
        assert!(text.contains(reason), "{raw:?} → {text}");
        assert!(
            !text.contains('\u{1b}'),
            "control characters escaped: {text:?}"
        );
    }
}

proptest::proptest! {
    #[test]
    fn accepted_paths_never_escape(raw in "[a-z./\\\\\u{0}-\u{1f} ]{0,24}") {
        if let Ok(parsed) = StoragePath::parse(&raw) {
            let root = Path::new("/root-of-store");
            let joined = root.join(parsed.as_str());
            proptest::prop_assert!(joined.starts_with(root));
            for segment in parsed.segments() {
                proptest::prop_assert!(!segment.is_empty() && segment != ".." && segment != ".");
                proptest::prop_assert!(!segment.chars().any(char::is_control));
            }
        }
    }
}

#[test]
fn workers_see_their_folders_tasks_and_shared_only() {
    let tasks = vec!["7".to_owned(), "9".to_owned()];
    let ann = AgentScope {
        name: "ann",
        role: Role::Worker,
        task_ids: &tasks,
    };
    let cases = [
        ("agents/ann/memory.md", Access::ReadWrite),
        ("agents/ann/skills/x/SKILL.md", Access::ReadWrite),
        ("agents/bob/memory.md", Access::None),
        ("agents/ann", Access::None),
        ("shared/team.md", Access::ReadWrite),
        ("tasks/7/spec.md", Access::Read),
        ("tasks/7/plan.md", Access::ReadWrite),
        ("tasks/7/progress.md", Access::ReadWrite),
        ("tasks/7/result.md", Access::ReadWrite),
        ("tasks/7/out/spec.md", Access::ReadWrite),
        ("tasks/9/data.csv", Access::ReadWrite),
        ("tasks/8/spec.md", Access::None),
        ("tasks/77/plan.md", Access::None),
        ("other/x", Access::None),
        ("annual.md", Access::None),
    ];
    for (raw, expected) in cases {
        assert_eq!(access::access(ann, &path(raw)), expected, "{raw}");
    }
    let manager = AgentScope {
        name: "manager",
        role: Role::Manager,
        task_ids: &[],
    };
    for (raw, _) in cases {
        assert_eq!(
            access::access(manager, &path(raw)),
            Access::ReadWrite,
            "{raw}"
        );
    }

    let spec = task_file("7", TaskFile::Spec).expect("valid");
    access::check(ann, &spec, Operation::Read).expect("may read the spec");
    let error = access::check(ann, &spec, Operation::Write).expect_err("spec is read-only");
    assert!(error.to_string().contains("plan.md"), "{error}");
    let error = access::check(
        ann,
        &agent_path("bob", "m.md").expect("valid"),
        Operation::Read,
    )
    .expect_err("not hers");
    assert!(matches!(error, StorageError::Forbidden { .. }));
    assert!(error.to_string().contains("agents/<own name>/"), "{error}");
    access::check(ann, &shared_path("x.md").expect("valid"), Operation::Write).expect("shared");
    access::check(
        ann,
        &task_path("9", "a/b.txt").expect("valid"),
        Operation::Write,
    )
    .expect("own task");
    assert!(task_path("../7", "x").is_err());
}

#[tokio::test]
async fn listings_filtered_to_what_a_worker_may_read() {
    let fixture = Fixture::local().await;
    let storage = fixture.storage().await;
    for key in [
        "agents/ann/memory.md",
        "agents/bob/memory.md",
        "tasks/7/spec.md",
        "tasks/8/spec.md",
        "shared/team.md",
    ] {
        storage.put_bytes(&path(key), "x").await.expect("put");
    }
    let tasks = vec!["7".to_owned()];
    let ann = AgentScope {
        name: "ann",
        role: Role::Worker,
        task_ids: &tasks,
    };
    let visible: Vec<String> =
        access::readable(ann, storage.list(&prefix("")).await.expect("list"))
            .into_iter()
            .map(|meta| meta.path)
            .collect();
    assert_eq!(
        visible,
        ["agents/ann/memory.md", "shared/team.md", "tasks/7/spec.md"]
    );
}

// ---------------------------------------------------------------------------------------------
// Signed links over real HTTP.

async fn serve_links(storage: Storage, base_from_port: bool) -> (String, Links) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind links listener");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let links = Links::new(
        matrix_crew::secret::Secret::new("link-signing-secret-for-tests"),
        base_from_port.then(|| format!("{base}/").parse().expect("valid base url")),
        Duration::from_secs(3600),
        MIB as u64,
    );
    let app = links_router(storage, links.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, links)
}

#[tokio::test]
async fn signed_links_valid_expired_tampered() {
    let fixture = Fixture::local().await;
    let storage = fixture.storage().await;
    let report = path("tasks/3/result.md");
    storage
        .put_bytes(&report, "# Result\nall done\n")
        .await
        .expect("put");
    storage
        .put_bytes(&path("agents/bob/private.md"), "secret plans")
        .await
        .expect("put");
    let (base, links) = serve_links(storage.clone(), true).await;
    let http = reqwest::Client::new();

    let link = links
        .link(&report, SystemTime::now())
        .expect("base url set");
    assert!(
        link.url
            .starts_with(&format!("{base}/files/tasks/3/result.md?expires="))
    );
    let response = http.get(&link.url).send().await.expect("GET link");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/markdown; charset=utf-8"
    );
    assert_eq!(response.headers()["content-security-policy"], "sandbox");
    assert_eq!(response.text().await.expect("body"), "# Result\nall done\n");

    let expired = links
        .link_until(&report, now_unix() - 10)
        .expect("base url set");
    let response = http.get(&expired.url).send().await.expect("GET expired");
    assert_eq!(response.status(), 410);
    assert!(response.text().await.expect("body").contains("expired"));

    let tampered = [
        // Another file with the same signature.
        link.url
            .replace("tasks/3/result.md", "agents/bob/private.md"),
        // A later expiry.
        link.url.replace("expires=", "expires=9"),
        // A changed signature.
        format!("{}A", link.url),
        // No signature.
        link.url.split("&sig=").next().expect("has sig").to_owned(),
    ];
    for url in tampered {
        let response = http.get(&url).send().await.expect("GET tampered");
        assert_eq!(response.status(), 403, "{url}");
        let text = response.text().await.expect("body");
        assert!(text.contains("link"), "{text}");
        assert!(!text.contains("secret plans"));
    }

    // Signed links to files that went away answer 404.
    let gone = path("shared/gone.txt");
    storage.put_bytes(&gone, "x").await.expect("put");
    let link_to_gone = links.link(&gone, SystemTime::now()).expect("base url set");
    storage.delete(&gone).await.expect("delete");
    let response = http.get(&link_to_gone.url).send().await.expect("GET");
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn signed_links_stream_large_files_from_s3() {
    let fixture = Fixture::s3().await;
    let storage = fixture.storage().await;
    let at = path("tasks/5/build output.tar");
    let total = 20 * MIB + 3;
    storage
        .put(&at, generated(total, 77_777, 5))
        .await
        .expect("put");
    let (expected, _, _) = hash_stream(generated(total, 77_777, 5)).await;
    let (_, links) = serve_links(storage, true).await;
    let link = links.link(&at, SystemTime::now()).expect("base url set");
    assert!(
        link.url.contains("/files/tasks/5/build%20output.tar?"),
        "{}",
        link.url
    );
    let response = reqwest::get(&link.url).await.expect("GET link");
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(total as u64));
    let body: BodyStream = Box::pin(
        response
            .bytes_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other)),
    );
    let (actual, read, _) = hash_stream(body).await;
    assert_eq!(read, total as u64);
    assert_eq!(actual, expected);
}

#[tokio::test]
async fn chat_references_link_or_ask_for_an_upload() {
    let fixture = Fixture::local().await;
    let storage = fixture.storage().await;
    let small = path("tasks/3/result.md");
    storage
        .put_bytes(&small, vec![b'a'; 1536])
        .await
        .expect("put");
    let big = path("tasks/3/big.bin");
    storage
        .put(&big, generated(2 * MIB, 65_536, 3))
        .await
        .expect("put");
    let (base, links) = serve_links(storage.clone(), true).await;
    let now = SystemTime::now();

    let FileReference::Link { text, link, meta } = links
        .reference(&storage, &small, false, now)
        .await
        .expect("reference")
    else {
        panic!("with a public base URL the reference is a link");
    };
    assert_eq!(meta.size, 1536);
    assert!(text.starts_with("`tasks/3/result.md` (1.5 KB): "), "{text}");
    assert!(
        text.contains(&link.url) && link.url.starts_with(&base),
        "{text}"
    );
    assert!(text.contains("valid until"), "{text}");
    // The link in the text works.
    let response = reqwest::get(&link.url).await.expect("GET");
    assert_eq!(response.status(), 200);

    let reference = links
        .reference(&storage, &small, true, now)
        .await
        .expect("reference");
    assert!(
        matches!(&reference, FileReference::UploadAsFile { file_name, caption, .. }
            if file_name == "result.md" && caption == "`tasks/3/result.md` (1.5 KB)"),
        "small files may be uploaded on request: {reference:?}"
    );
    // Large files get a link even when an upload was asked for.
    let reference = links
        .reference(&storage, &big, true, now)
        .await
        .expect("reference");
    assert!(
        matches!(reference, FileReference::Link { .. }),
        "{reference:?}"
    );

    // Without a public base URL: upload small files, explain for large ones.
    let (_, no_base) = serve_links(storage.clone(), false).await;
    assert!(no_base.link(&small, now).is_none());
    let reference = no_base
        .reference(&storage, &small, false, now)
        .await
        .expect("ref");
    assert!(
        matches!(reference, FileReference::UploadAsFile { .. }),
        "{reference:?}"
    );
    let bytes = storage
        .get_bytes(&small, MIB as u64)
        .await
        .expect("bytes for upload");
    assert_eq!(bytes.len(), 1536);
    let reference = no_base
        .reference(&storage, &big, false, now)
        .await
        .expect("ref");
    let FileReference::PathOnly { text, .. } = reference else {
        panic!("too large to upload and no link: {reference:?}");
    };
    assert!(
        text.contains("public_base_url") && text.contains("2.0 MB"),
        "{text}"
    );
    let error = storage
        .get_bytes(&big, MIB as u64)
        .await
        .expect_err("too big");
    assert!(matches!(error, StorageError::TooLarge { .. }));

    let missing = links
        .reference(&storage, &path("tasks/3/none.md"), false, now)
        .await
        .expect_err("missing");
    assert!(matches!(missing, StorageError::NotFound { .. }));
}

#[tokio::test]
async fn link_secret_is_generated_private_and_stable() {
    let data = tempfile::tempdir().expect("temp dir");
    let config = StorageConfig {
        public_base_url: Some("https://crew.example.org".parse().expect("url")),
        ..StorageConfig::default()
    };
    let at = path("shared/a.md");
    let first = Links::open(&config, data.path(), |_| None).expect("open");
    let secret_file = data.path().join("links.secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .expect("secret file exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let second = Links::open(&config, data.path(), |_| None).expect("reopen");
    assert_eq!(first.link_until(&at, 5), second.link_until(&at, 5));
    let secret = std::fs::read_to_string(&secret_file).expect("read secret");
    assert!(!format!("{first:?}").contains(secret.trim()));

    // From the environment instead.
    let config = StorageConfig {
        link_secret_env: Some("TEST_LINK_SECRET".into()),
        ..config
    };
    let from_env = Links::open(&config, data.path(), |name| {
        (name == "TEST_LINK_SECRET").then(|| "another".to_owned())
    })
    .expect("open from env");
    assert_ne!(from_env.link_until(&at, 5), first.link_until(&at, 5));
    let error = Links::open(&config, data.path(), |_| None).expect_err("unset variable");
    assert!(error.to_string().contains("$TEST_LINK_SECRET"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The admin router and `crew files` over loopback.

struct Admin {
    client: matrix_crew::admin::AdminClient,
    cancel: tokio_util::sync::CancellationToken,
    _data: tempfile::TempDir,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start_admin(storage: Storage) -> Admin {
    let data = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin listener");
    let addr = listener.local_addr().expect("local addr");
    std::fs::write(data.path().join("registration.yaml"), "").expect("placeholder");
    let config: matrix_crew::config::Config = toml::from_str(&format!(
        "data_dir = {:?}\n[homeserver]\nurl = \"http://127.0.0.1:8008\"\nserver_name = \"example.org\"\n[admin_api]\nbind = \"{addr}\"\n",
        data.path().display().to_string()
    ))
    .expect("test config");
    let token =
        matrix_crew::admin::load_or_create_token(&config.admin_token_path()).expect("admin token");
    let cancel = tokio_util::sync::CancellationToken::new();
    let routes =
        axum::Router::new().nest("/files", matrix_crew::storage::admin::admin_router(storage));
    tokio::spawn(matrix_crew::admin::serve(
        listener,
        token,
        routes,
        cancel.clone(),
    ));
    Admin {
        client: matrix_crew::admin::AdminClient::from_config(&config).expect("admin client"),
        cancel,
        _data: data,
    }
}

#[tokio::test]
async fn files_command_ls_get_put_over_the_admin_endpoint() {
    use matrix_crew::storage::cli::FilesCommand;
    let fixture = Fixture::local().await;
    let storage = fixture.storage_with_limit(4 * MIB as u64).await;
    let admin = start_admin(storage.clone()).await;
    let work = tempfile::tempdir().expect("temp dir");

    let output = FilesCommand::Ls { prefix: None }
        .run(&admin.client)
        .await
        .expect("ls empty");
    assert_eq!(output, "no files yet");

    // put streams a local file up.
    let local = work.path().join("data.bin");
    let (expected, _, _) = hash_stream(generated(3 * MIB, 65_536, 4)).await;
    let mut body = generated(3 * MIB, 65_536, 4);
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        bytes.extend_from_slice(&chunk.expect("chunk"));
    }
    std::fs::write(&local, &bytes).expect("write local file");
    let output = FilesCommand::Put {
        path: "shared/data set.bin".into(),
        local_file: local.clone(),
    }
    .run(&admin.client)
    .await
    .expect("put");
    assert_eq!(output, "stored `shared/data set.bin` (3.0 MB)");
    storage
        .put_bytes(&path("tasks/1/spec.md"), "# Spec\nBuild it.\n")
        .await
        .expect("put spec");

    let output = FilesCommand::Ls { prefix: None }
        .run(&admin.client)
        .await
        .expect("ls");
    assert!(output.contains("shared/data set.bin"), "{output}");
    assert!(output.contains("tasks/1/spec.md"), "{output}");
    assert!(output.ends_with("2 file(s), 3.0 MB"), "{output}");
    let output = FilesCommand::Ls {
        prefix: Some("tasks/".into()),
    }
    .run(&admin.client)
    .await
    .expect("ls prefix");
    assert!(!output.contains("data set"), "{output}");

    // get prints text, saves anything with --out.
    let output = FilesCommand::Get {
        path: "tasks/1/spec.md".into(),
        out: None,
    }
    .run(&admin.client)
    .await
    .expect("get text");
    assert_eq!(output, "# Spec\nBuild it.\n");
    let out = work.path().join("copy.bin");
    let output = FilesCommand::Get {
        path: "shared/data set.bin".into(),
        out: Some(out.clone()),
    }
    .run(&admin.client)
    .await
    .expect("get --out");
    assert!(
        output.starts_with("saved `shared/data set.bin` (3.0 MB)"),
        "{output}"
    );
    let copied = std::fs::read(&out).expect("read copy");
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&copied)), expected);
    let error = FilesCommand::Get {
        path: "shared/data set.bin".into(),
        out: None,
    }
    .run(&admin.client)
    .await
    .expect_err("binary to the terminal");
    assert!(error.to_string().contains("--out"), "{error}");

    // Errors say what went wrong.
    let error = FilesCommand::Get {
        path: "shared/none.md".into(),
        out: None,
    }
    .run(&admin.client)
    .await
    .expect_err("missing");
    assert!(
        matches!(&error, matrix_crew::admin::AdminError::Server { status: 404, message } if message.contains("no file at `shared/none.md`")),
        "{error:?}"
    );
    let error = FilesCommand::Put {
        path: "../escape".into(),
        local_file: local.clone(),
    }
    .run(&admin.client)
    .await
    .expect_err("bad path");
    assert!(error.to_string().contains("`..`"), "{error}");
    let big = work.path().join("big.bin");
    std::fs::write(&big, vec![0u8; 4 * MIB + 1]).expect("write big file");
    let error = FilesCommand::Put {
        path: "shared/big.bin".into(),
        local_file: big,
    }
    .run(&admin.client)
    .await
    .expect_err("over the limit");
    assert!(
        matches!(
            &error,
            matrix_crew::admin::AdminError::Server { status: 413, .. }
        ),
        "{error:?}"
    );
    let error = FilesCommand::Put {
        path: "shared/x".into(),
        local_file: work.path().join("does-not-exist"),
    }
    .run(&admin.client)
    .await
    .expect_err("missing local file");
    assert!(error.to_string().contains("does-not-exist"), "{error}");

    // The raw routes: encoded paths that would escape are refused by the server too.
    let response = admin
        .client
        .execute(admin.client.request(
            reqwest::Method::GET,
            "/files/object/x/..%2F..%2Fadmin.token",
        ))
        .await
        .expect_err("escape attempt");
    assert!(
        matches!(
            &response,
            matrix_crew::admin::AdminError::Server { status: 400, .. }
        ),
        "{response:?}"
    );
    admin
        .client
        .execute(
            admin
                .client
                .request(reqwest::Method::DELETE, "/files/object/tasks/1/spec.md"),
        )
        .await
        .expect("delete");
    assert!(matches!(
        storage.head(&path("tasks/1/spec.md")).await,
        Err(StorageError::NotFound { .. })
    ));

    // Without the token nothing works.
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/files/list",
            admin_addr(&admin.client).await
        ))
        .send()
        .await
        .expect("GET without token");
    assert_eq!(response.status(), 401);
}

async fn admin_addr(client: &matrix_crew::admin::AdminClient) -> String {
    // The client builds URLs from its configured address; recover it from a request.
    let request = client
        .request(reqwest::Method::GET, "/")
        .build()
        .expect("request");
    let url = request.url();
    format!(
        "{}:{}",
        url.host_str().expect("host"),
        url.port().expect("port")
    )
}
