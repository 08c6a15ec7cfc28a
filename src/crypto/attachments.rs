//! Encrypted attachments: files in encrypted rooms are uploaded as ciphertext and their key
//! travels in the (encrypted) event's `file` field. Files people send are decrypted here,
//! checked against their SHA-256, and then stored like clear files; files agents share are
//! encrypted here before their upload (`crate::matrix::MatrixClient::upload_for_room`).

use std::io::Read;

use bytes::Bytes;
use futures::TryStreamExt;
use matrix_sdk_crypto::{AttachmentDecryptor, AttachmentEncryptor, MediaEncryptionInfo};
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
    #[error("it could not be encrypted: {0}")]
    Encrypt(String),
}

/// `plaintext` encrypted with a fresh key (AES-256-CTR, SHA-256 of the ciphertext), and the
/// `file` field that lets the room's members decrypt it once `url` (the ciphertext's `mxc://`)
/// is filled in: `{"v", "key", "iv", "hashes"}`. The key exists only in that field, which
/// travels inside the encrypted event.
pub async fn encrypt(plaintext: Vec<u8>) -> Result<(Vec<u8>, Value), AttachmentError> {
    tokio::task::spawn_blocking(move || {
        let mut reader = std::io::Cursor::new(plaintext);
        let mut encryptor = AttachmentEncryptor::new(&mut reader);
        let mut ciphertext = Vec::new();
        encryptor
            .read_to_end(&mut ciphertext)
            .map_err(|error| AttachmentError::Encrypt(error.to_string()))?;
        let file = serde_json::to_value(encryptor.finish())
            .map_err(|error| AttachmentError::Encrypt(error.to_string()))?;
        Ok((ciphertext, file))
    })
    .await
    .map_err(|error| AttachmentError::Encrypt(error.to_string()))?
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_agents_encrypt_people_can_decrypt_and_changes_are_caught() {
        let plaintext = b"the report \xe2\x80\x94 bytes and all \x00\xff".to_vec();
        let (ciphertext, mut file) = encrypt(plaintext.clone()).await.unwrap();
        assert_ne!(ciphertext, plaintext);
        // The spec's EncryptedFile fields, as clients read them.
        assert_eq!(file["v"], "v2");
        assert_eq!(file["key"]["alg"], "A256CTR");
        assert!(file["iv"].is_string() && file["hashes"]["sha256"].is_string());
        file["url"] = Value::from("mxc://x/y");
        let body = |bytes: Vec<u8>| -> MediaStream {
            Box::pin(futures::stream::once(async move { Ok(Bytes::from(bytes)) }))
        };
        let decrypted: Vec<Bytes> = decrypt(&file, body(ciphertext.clone()))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(decrypted.concat(), plaintext);
        let mut changed = ciphertext;
        changed[0] ^= 1;
        assert!(matches!(
            decrypt(&file, body(changed)).await,
            Err(AttachmentError::Decrypt(_))
        ));
    }
}
