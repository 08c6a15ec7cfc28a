//! The S3 backend (AWS S3, MinIO, or any server speaking the S3 API) via aws-sdk-s3.
//!
//! Uploads of unknown length are cut into parts: a body that fits in one part is sent with one
//! `PutObject`, a longer one as a multipart upload, one part in memory at a time, so memory stays
//! bounded by [`PART_BYTES`] whatever the file size. Errors the operator can fix (missing bucket,
//! wrong credentials) get their own [`StorageError`] variants. Not a general S3 client: no bucket
//! management, no versioning.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_types::error::display::DisplayErrorContext;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{BodyStream, Object, ObjectMeta, S3Config, StorageError, StoragePath, StoragePrefix};

/// Size of one multipart part: above S3's 5 MiB minimum for all parts but the last, and the
/// bound on memory held per upload. 10 000 parts (the S3 maximum) of 8 MiB allow 78 GiB files.
pub const PART_BYTES: usize = 8 * 1024 * 1024;

/// Connect timeout, so an unreachable endpoint fails in seconds rather than hanging a turn.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A bucket on an S3-compatible server.
#[derive(Debug)]
pub struct S3Backend {
    client: Client,
    bucket: String,
    endpoint: String,
    access_key_env: String,
    secret_key_env: String,
}

impl S3Backend {
    /// Builds the client from `config`, reading the credentials through `env` (the variables
    /// `config.access_key_env` / `config.secret_key_env`, or files named by `<NAME>_FILE`). Does
    /// not contact the server; see [`S3Backend::check`].
    pub fn connect(
        config: &S3Config,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StorageError> {
        if config.bucket.is_empty() {
            return Err(StorageError::Config(
                "storage.s3.bucket is empty; name the bucket to keep files in".into(),
            ));
        }
        let access_key = read_secret(&env, &config.access_key_env)?;
        let secret_key = read_secret(&env, &config.secret_key_env)?;
        let credentials = Credentials::new(
            access_key.expose(),
            secret_key.expose(),
            None,
            None,
            "matrix-crew storage config",
        );
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(config.path_style)
            // Checksums only where S3 requires them: MinIO and other servers differ in which
            // flexible-checksum headers they accept.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .build(),
            );
        let endpoint = match &config.endpoint {
            Some(url) => {
                let url = url.as_str().trim_end_matches('/').to_owned();
                builder = builder.endpoint_url(&url);
                url
            }
            None => format!("AWS S3 ({})", config.region),
        };
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            endpoint,
            access_key_env: config.access_key_env.clone(),
            secret_key_env: config.secret_key_env.clone(),
        })
    }

    /// For logs and status output.
    pub fn describe(&self) -> String {
        format!("S3 bucket `{}` at {}", self.bucket, self.endpoint)
    }

    /// Checks that the bucket exists and the credentials are accepted.
    pub async fn check(&self) -> Result<(), StorageError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(drop)
            .map_err(|error| self.classify("HeadBucket", None, error))
    }

    pub(super) async fn put(
        &self,
        path: &StoragePath,
        body: BodyStream,
    ) -> Result<ObjectMeta, StorageError> {
        // Fused: `fill_part` may poll again after the end.
        let mut body: BodyStream = Box::pin(body.fuse());
        let content_type = super::content_type_for(path.as_str());
        let first = fill_part(&mut body, path).await?;
        if first.len() < PART_BYTES {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(path.as_str())
                .content_type(content_type)
                .body(ByteStream::from(first))
                .send()
                .await
                .map_err(|error| self.classify("PutObject", Some(path), error))?;
            return self.head(path).await;
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(path.as_str())
            .content_type(content_type)
            .send()
            .await
            .map_err(|error| self.classify("CreateMultipartUpload", Some(path), error))?;
        let Some(upload_id) = upload.upload_id() else {
            return Err(StorageError::S3 {
                operation: "CreateMultipartUpload",
                detail: "the server returned no upload id".into(),
            });
        };
        let result = self.upload_parts(path, upload_id, first, body).await;
        if result.is_err() {
            // Best effort: otherwise the server keeps the parts (and bills for them).
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(path.as_str())
                .upload_id(upload_id)
                .send()
                .await;
        }
        result?;
        self.head(path).await
    }

    async fn upload_parts(
        &self,
        path: &StoragePath,
        upload_id: &str,
        first: Bytes,
        mut body: BodyStream,
    ) -> Result<(), StorageError> {
        let mut parts = Vec::new();
        let mut part = first;
        loop {
            let number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(path.as_str())
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(part))
                .send()
                .await
                .map_err(|error| self.classify("UploadPart", Some(path), error))?;
            parts.push(
                CompletedPart::builder()
                    .set_e_tag(uploaded.e_tag().map(str::to_owned))
                    .part_number(number)
                    .build(),
            );
            part = fill_part(&mut body, path).await?;
            if part.is_empty() {
                break;
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(path.as_str())
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| self.classify("CompleteMultipartUpload", Some(path), error))?;
        Ok(())
    }

    pub(super) async fn get(&self, path: &StoragePath) -> Result<Object, StorageError> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .send()
            .await
            .map_err(|error| self.classify("GetObject", Some(path), error))?;
        let meta = ObjectMeta::new(
            path.as_str(),
            size(output.content_length()),
            modified(output.last_modified()),
        );
        // The SDK's own chunks, passed on as they arrive (no copy through a reader).
        let body = futures::stream::unfold(output.body, |mut body| async move {
            body.next()
                .await
                .map(|chunk| (chunk.map_err(std::io::Error::other), body))
        });
        Ok(Object {
            meta,
            body: Box::pin(body),
        })
    }

    pub(super) async fn head(&self, path: &StoragePath) -> Result<ObjectMeta, StorageError> {
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .send()
            .await
            .map_err(|error| self.classify("HeadObject", Some(path), error))?;
        Ok(ObjectMeta::new(
            path.as_str(),
            size(output.content_length()),
            modified(output.last_modified()),
        ))
    }

    pub(super) async fn list(
        &self,
        prefix: &StoragePrefix,
    ) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut request = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .set_continuation_token(token.take());
            if !prefix.as_str().is_empty() {
                request = request.prefix(prefix.as_str());
            }
            let output = request
                .send()
                .await
                .map_err(|error| self.classify("ListObjectsV2", None, error))?;
            for object in output.contents() {
                let Some(key) = object.key() else { continue };
                out.push(ObjectMeta::new(
                    key,
                    size(object.size()),
                    modified(object.last_modified()),
                ));
            }
            match output.next_continuation_token() {
                Some(next) if output.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    pub(super) async fn delete(&self, path: &StoragePath) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .send()
            .await
            .map(drop)
            .map_err(|error| self.classify("DeleteObject", Some(path), error))
    }

    /// Turns an SDK error into the [`StorageError`] that tells the operator what to fix.
    fn classify<E>(
        &self,
        operation: &'static str,
        path: Option<&StoragePath>,
        error: SdkError<E, HttpResponse>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        if let SdkError::ServiceError(context) = &error {
            let code = context.err().code().unwrap_or_default().to_owned();
            let message = context.err().message().unwrap_or_default().to_owned();
            let status = context.raw().status().as_u16();
            match code.as_str() {
                "NoSuchBucket" => return self.bucket_missing(),
                "NoSuchKey" => return not_found(path, operation),
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "InvalidSecurity"
                | "ExpiredToken" => return self.credentials(code, message),
                _ => {}
            }
            match status {
                404 if path.is_some() => return not_found(path, operation),
                404 => return self.bucket_missing(),
                401 | 403 => {
                    let code = if code.is_empty() {
                        status.to_string()
                    } else {
                        code
                    };
                    return self.credentials(code, message);
                }
                _ => {}
            }
        }
        StorageError::S3 {
            operation,
            detail: format!("{} ({})", DisplayErrorContext(&error), self.endpoint),
        }
    }

    fn bucket_missing(&self) -> StorageError {
        StorageError::BucketMissing {
            bucket: self.bucket.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    fn credentials(&self, code: String, message: String) -> StorageError {
        StorageError::Credentials {
            endpoint: self.endpoint.clone(),
            code,
            message,
            access_key_env: self.access_key_env.clone(),
            secret_key_env: self.secret_key_env.clone(),
        }
    }
}

fn not_found(path: Option<&StoragePath>, operation: &'static str) -> StorageError {
    match path {
        Some(path) => StorageError::NotFound {
            path: path.to_string(),
        },
        None => StorageError::S3 {
            operation,
            detail: "not found".into(),
        },
    }
}

/// Reads up to [`PART_BYTES`] from `body`; an empty result means the body has ended.
async fn fill_part(body: &mut BodyStream, path: &StoragePath) -> Result<Bytes, StorageError> {
    let mut part = BytesMut::new();
    while part.len() < PART_BYTES {
        match body.next().await {
            Some(Ok(chunk)) => {
                if part.is_empty() && chunk.len() >= PART_BYTES {
                    return Ok(chunk);
                }
                if part.capacity() == 0 {
                    part.reserve(PART_BYTES.max(chunk.len()));
                }
                part.extend_from_slice(&chunk);
            }
            Some(Err(source)) => {
                return Err(StorageError::Body {
                    path: path.to_string(),
                    source,
                });
            }
            None => break,
        }
    }
    Ok(part.freeze())
}

fn read_secret(
    env: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<crate::secret::Secret, StorageError> {
    crate::config::secret_from_env(env, name)
        .map_err(|error| StorageError::Config(error.to_string()))?
        .ok_or_else(|| {
            StorageError::Config(format!(
                "the S3 backend needs credentials: set ${name} or ${name}_FILE (see storage.s3.access_key_env / secret_key_env)"
            ))
        })
}

fn size(length: Option<i64>) -> u64 {
    length.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

fn modified(time: Option<&aws_smithy_types::DateTime>) -> Option<SystemTime> {
    time.and_then(|time| SystemTime::try_from(*time).ok())
}
