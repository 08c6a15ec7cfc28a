//! Encrypted attachments: files people send into encrypted rooms are uploaded as ciphertext and
//! their key travels in the (encrypted) event's `file` field. They are decrypted here, checked
//! against their SHA-256, and then stored like clear files.

use std::io::Read;

use bytes::Bytes;
use futures::TryStreamExt;
use matrix_sdk_crypto::{AttachmentDecryptor, MediaEncryptionInfo};
use serde_json::Value;

use crate::storage::BodyStream as MediaStream;

/// Why an encrypted attachment could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("its `file` field is not an encrypted file description: {0}")]
    Info(String),
    #[error("downloading it failed: {0}")]
    Download(std::io::Error),
    #[error("it does not decrypt (wrong key, or changed on the server): {0}")]
    Decrypt(String),
}

/// Decrypts `body` (the ciphertext as downloaded, already bounded by the storage's size limit)
/// with the key in `file` (the event's `file` field) into a stream for storage.
pub async fn decrypt(file: &Value, body: MediaStream) -> Result<MediaStream, AttachmentError> {
    let info: MediaEncryptionInfo = serde_json::from_value(file.clone())
        .map_err(|error| AttachmentError::Info(error.to_string()))?;
    let chunks: Vec<Bytes> = body
        .try_collect()
        .await
        .map_err(AttachmentError::Download)?;
    let ciphertext = chunks.concat();
    let plaintext = tokio::task::spawn_blocking(move || {
        let mut reader = std::io::Cursor::new(ciphertext);
        let mut decryptor = AttachmentDecryptor::new(&mut reader, info)
            .map_err(|error| AttachmentError::Decrypt(error.to_string()))?;
        let mut plaintext = Vec::new();
        // The hash is checked when the reader reaches the end: a changed file fails here.
        decryptor
            .read_to_end(&mut plaintext)
            .map_err(|error| AttachmentError::Decrypt(error.to_string()))?;
        Ok::<_, AttachmentError>(plaintext)
    })
    .await
    .map_err(|error| AttachmentError::Decrypt(error.to_string()))??;
    Ok(Box::pin(futures::stream::once(async move {
        Ok(Bytes::from(plaintext))
    })))
}
