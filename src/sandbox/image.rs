//! `crew sandbox build`: makes the sandbox image without any image registry, from Debian's
//! packages: `debootstrap --variant=minbase` into a folder (shell and coreutils come with the
//! base system; git, curl, CA certificates and Python 3 are included), documentation and
//! package caches removed, then `docker import` of that folder.
//!
//! Where a registry is reachable, `docker/sandbox/Dockerfile` builds an equivalent image.

use std::path::Path;
use std::process::Stdio;

use bollard::query_parameters::CreateImageOptionsBuilder;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::SandboxError;
use super::config::{BASE_PACKAGES, SandboxConfig};

/// Folders removed from the bootstrapped system before import: nothing a command needs.
const PRUNED: &[&str] = &[
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
];

/// Builds `config.image` in a scratch folder under `work_dir`, reporting each step to
/// `progress`.
pub async fn build(
    config: &SandboxConfig,
    work_dir: &Path,
    progress: impl Fn(&str),
) -> Result<(), SandboxError> {
    let docker = config.connect().await?;
    let debootstrap = find_debootstrap(&progress).await?;
    let rootfs = work_dir.join("sandbox-rootfs");
    if rootfs.exists() {
        tokio::fs::remove_dir_all(&rootfs).await?;
    }
    tokio::fs::create_dir_all(work_dir).await?;
    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|p| (*p).to_owned()).collect();
    packages.extend(config.extra_packages.iter().cloned());
    progress(&format!(
        "debootstrap {} (minbase + {}) from {}",
        config.debian_suite,
        packages.join(","),
        config.debian_mirror
    ));
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(&debootstrap)
        .arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg(&config.debian_suite)
        .arg(&rootfs)
        .arg(&config.debian_mirror)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| SandboxError::Build(format!("cannot run debootstrap: {error}")))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let mut errors = String::new();
    let mut out_lines = BufReader::new(stdout).lines();
    let mut err_lines = BufReader::new(stderr).lines();
    loop {
        tokio::select! {
            line = out_lines.next_line() => match line {
                Ok(Some(line)) => progress(&format!("  {line}")),
                _ => break,
            },
            line = err_lines.next_line() => if let Ok(Some(line)) = line {
                progress(&format!("  {line}"));
                errors.push_str(&line);
                errors.push('\n');
            },
        }
    }
    while let Ok(Some(line)) = err_lines.next_line().await {
        errors.push_str(&line);
        errors.push('\n');
    }
    let status = child.wait().await?;
    if !status.success() {
        let hint = if is_root() {
            ""
        } else {
            " (debootstrap needs root: run `sudo crew sandbox build`)"
        };
        return Err(SandboxError::Build(format!(
            "debootstrap failed with {status}{hint}: {}",
            errors.trim()
        )));
    }
    progress(&format!(
        "bootstrapped in {:.0} s; pruning documentation and caches",
        started.elapsed().as_secs_f64()
    ));
    for pruned in PRUNED {
        let path = rootfs.join(pruned);
        if path.exists() {
            tokio::fs::remove_dir_all(&path).await?;
            tokio::fs::create_dir_all(&path).await?;
        }
    }
    progress(&format!("importing into Docker as {}", config.image));
    import(&docker, &rootfs, &config.image).await?;
    tokio::fs::remove_dir_all(&rootfs).await?;
    progress(&format!(
        "built {} in {:.0} s",
        config.image,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// `tar` of the folder streamed into `docker import`.
async fn import(docker: &bollard::Docker, rootfs: &Path, image: &str) -> Result<(), SandboxError> {
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    let mut tar = tokio::process::Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|error| SandboxError::Build(format!("cannot run tar: {error}")))?;
    let stdout = tar.stdout.take().expect("piped");
    let body = tokio_util::io::ReaderStream::new(stdout);
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .changes(
            [
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                "WORKDIR /workspace",
                "CMD [\"sleep\", \"infinity\"]",
            ]
            .map(String::from)
            .to_vec(),
        )
        .build();
    let mut stream = docker.create_image(Some(options), Some(bollard::body_try_stream(body)), None);
    while let Some(step) = stream.next().await {
        step.map_err(|error| SandboxError::Build(format!("docker import: {error}")))?;
    }
    let status = tar.wait().await?;
    if !status.success() {
        return Err(SandboxError::Build(format!("tar failed with {status}")));
    }
    Ok(())
}

/// debootstrap's path, installing it with apt-get when it is missing and crew runs as root.
async fn find_debootstrap(progress: &impl Fn(&str)) -> Result<String, SandboxError> {
    for candidate in ["/usr/sbin/debootstrap", "/usr/bin/debootstrap"] {
        if Path::new(candidate).exists() {
            return Ok(candidate.to_owned());
        }
    }
    if !is_root() {
        return Err(SandboxError::Build(
            "debootstrap is not installed: install it (`sudo apt-get install debootstrap`) and run `sudo crew sandbox build`".into(),
        ));
    }
    progress("installing debootstrap with apt-get");
    for args in [
        &["update", "-q"][..],
        &["install", "-y", "-q", "debootstrap"][..],
    ] {
        let output = tokio::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .await
            .map_err(|error| {
                SandboxError::Build(format!(
                    "debootstrap is not installed and apt-get cannot run ({error}); install debootstrap by hand"
                ))
            })?;
        if !output.status.success() {
            return Err(SandboxError::Build(format!(
                "debootstrap is not installed and `apt-get {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    Ok("/usr/sbin/debootstrap".to_owned())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // The owner of a file crew just made is its effective user.
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}
