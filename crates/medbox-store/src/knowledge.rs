//! The knowledge base's documents and their embedded chunks.
//!
//! A document is stored once per text (its SHA-256 is unique): adding the
//! same text again is [`KnowledgeInsert::AlreadyPresent`] and changes
//! nothing. A document and its chunks are written, re-embedded and deleted
//! in one transaction each, so a reader never sees half a document.
//! Vectors are stored as little-endian f32 bytes.

use sqlx::{Row, any::AnyRow};

use crate::{
    Store, StoreError, datasets::decode_error, datasets::to_i64, datasets::to_u64, random_id,
};

const DOCUMENT_ID_PREFIX: &str = "kd_";

/// A chunk to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewKnowledgeChunk {
    pub ordinal: u32,
    /// Headings joined by " > "; empty before the first heading.
    pub section: String,
    pub text: String,
    pub vector: Vec<f32>,
}

/// A document to store, with every chunk embedded.
#[derive(Debug, Clone, PartialEq)]
pub struct NewKnowledgeDocument {
    pub title: String,
    pub source: String,
    /// `markdown` or `text`.
    pub format: String,
    /// SHA-256 of the text, hex.
    pub sha256: String,
    pub bytes: u64,
    /// The embedding model's name and the length of every vector.
    pub embedding_model: String,
    pub embedding_dimensions: u32,
    pub chunks: Vec<NewKnowledgeChunk>,
}

/// A stored document (without its chunks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnowledgeDocumentRecord {
    /// `kd_` + 12 hex digits.
    pub id: String,
    pub title: String,
    pub source: String,
    pub format: String,
    pub sha256: String,
    pub bytes: u64,
    pub chunk_count: u64,
    pub embedding_model: String,
    pub embedding_dimensions: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A stored chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct KnowledgeChunkRecord {
    pub document_id: String,
    pub ordinal: u32,
    pub section: String,
    pub text: String,
    pub vector: Vec<f32>,
}

/// What [`Store::insert_knowledge_document`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnowledgeInsert {
    Inserted(KnowledgeDocumentRecord),
    /// A document with the same SHA-256 was already stored; nothing changed.
    AlreadyPresent(KnowledgeDocumentRecord),
}

impl KnowledgeInsert {
    pub fn record(&self) -> &KnowledgeDocumentRecord {
        match self {
            KnowledgeInsert::Inserted(record) | KnowledgeInsert::AlreadyPresent(record) => record,
        }
    }
}

const DOCUMENT_COLUMNS: &str = "id, title, source, format, sha256, bytes, chunk_count, \
     embedding_model, embedding_dimensions, created_at_ms, updated_at_ms";

/// Little-endian f32 bytes of a vector.
pub fn vector_to_bytes(vector: &[f32]) -> Vec<u8> {
    vector
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// A vector from its little-endian bytes; `None` unless the length is a multiple of 4.
pub fn vector_from_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|quad| f32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]))
            .collect(),
    )
}

impl Store {
    /// Stores a document and its chunks at `now_ms`, unless a document with
    /// the same SHA-256 exists: then that one is returned and nothing changes.
    pub async fn insert_knowledge_document(
        &self,
        document: &NewKnowledgeDocument,
        now_ms: i64,
    ) -> Result<KnowledgeInsert, StoreError> {
        const OPERATION: &str = "storing a knowledge document";
        if let Some(existing) = self
            .find_knowledge_document_by_sha256(&document.sha256)
            .await?
        {
            return Ok(KnowledgeInsert::AlreadyPresent(existing));
        }
        let id = random_id(DOCUMENT_ID_PREFIX)?;
        match self.insert_document_rows(&id, document, now_ms).await {
            Ok(record) => Ok(KnowledgeInsert::Inserted(record)),
            Err(error) => {
                // Another writer stored the same text meanwhile (the unique
                // index refused this one): that document is the answer.
                if let Some(existing) = self
                    .find_knowledge_document_by_sha256(&document.sha256)
                    .await?
                {
                    return Ok(KnowledgeInsert::AlreadyPresent(existing));
                }
                Err(StoreError::query(OPERATION)(error))
            }
        }
    }

    async fn insert_document_rows(
        &self,
        id: &str,
        document: &NewKnowledgeDocument,
        now_ms: i64,
    ) -> Result<KnowledgeDocumentRecord, sqlx::Error> {
        let mut transaction = self.begin_write().await?;
        let sql = format!(
            "INSERT INTO knowledge_documents ({DOCUMENT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING {DOCUMENT_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(&document.title)
            .bind(&document.source)
            .bind(&document.format)
            .bind(&document.sha256)
            .bind(to_i64(document.bytes))
            .bind(to_i64(document.chunks.len() as u64))
            .bind(&document.embedding_model)
            .bind(i64::from(document.embedding_dimensions))
            .bind(now_ms)
            .fetch_one(&mut *transaction)
            .await?;
        let record = document_from_row(&row)?;
        for chunk in &document.chunks {
            sqlx::query(
                "INSERT INTO knowledge_chunks (document_id, ordinal, section, text, vector) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(i64::from(chunk.ordinal))
            .bind(&chunk.section)
            .bind(&chunk.text)
            .bind(vector_to_bytes(&chunk.vector))
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(record)
    }

    pub async fn find_knowledge_document_by_sha256(
        &self,
        sha256: &str,
    ) -> Result<Option<KnowledgeDocumentRecord>, StoreError> {
        self.knowledge_document_where("sha256", sha256).await
    }

    pub async fn get_knowledge_document(
        &self,
        id: &str,
    ) -> Result<Option<KnowledgeDocumentRecord>, StoreError> {
        self.knowledge_document_where("id", id).await
    }

    /// The document whose unique `column` (a name fixed in this file) is `value`.
    async fn knowledge_document_where(
        &self,
        column: &'static str,
        value: &str,
    ) -> Result<Option<KnowledgeDocumentRecord>, StoreError> {
        let sql = format!("SELECT {DOCUMENT_COLUMNS} FROM knowledge_documents WHERE {column} = $1");
        let row = sqlx::query(&sql)
            .bind(value)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up a knowledge document"))?;
        row.as_ref()
            .map(document_from_row)
            .transpose()
            .map_err(StoreError::query("reading a knowledge document"))
    }

    /// Every document, oldest first.
    pub async fn list_knowledge_documents(
        &self,
    ) -> Result<Vec<KnowledgeDocumentRecord>, StoreError> {
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM knowledge_documents ORDER BY created_at_ms, id"
        );
        let rows = sqlx::query(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing knowledge documents"))?;
        rows.iter()
            .map(document_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading the knowledge document list"))
    }

    /// A document's chunks in order.
    pub async fn knowledge_chunks(
        &self,
        document_id: &str,
    ) -> Result<Vec<KnowledgeChunkRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT document_id, ordinal, section, text, vector FROM knowledge_chunks \
             WHERE document_id = $1 ORDER BY ordinal",
        )
        .bind(document_id)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::query("reading knowledge chunks"))?;
        rows.iter()
            .map(chunk_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading knowledge chunks"))
    }

    /// Deletes a document and its chunks; `false` when there was none.
    pub async fn delete_knowledge_document(&self, id: &str) -> Result<bool, StoreError> {
        const OPERATION: &str = "deleting a knowledge document";
        let mut transaction = self
            .begin_write()
            .await
            .map_err(StoreError::query(OPERATION))?;
        sqlx::query("DELETE FROM knowledge_chunks WHERE document_id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await
            .map_err(StoreError::query(OPERATION))?;
        let deleted = sqlx::query("DELETE FROM knowledge_documents WHERE id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await
            .map_err(StoreError::query(OPERATION))?
            .rows_affected();
        transaction
            .commit()
            .await
            .map_err(StoreError::query(OPERATION))?;
        Ok(deleted > 0)
    }

    /// Replaces every chunk's vector of a document (in ordinal order) and
    /// records the model that made them; `false` when the document is gone
    /// or its chunk count differs from `vectors`.
    pub async fn replace_knowledge_vectors(
        &self,
        document_id: &str,
        embedding_model: &str,
        embedding_dimensions: u32,
        vectors: &[Vec<f32>],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        const OPERATION: &str = "re-embedding a knowledge document";
        let mut transaction = self
            .begin_write()
            .await
            .map_err(StoreError::query(OPERATION))?;
        let updated = sqlx::query(
            "UPDATE knowledge_documents SET embedding_model = $1, embedding_dimensions = $2, \
             updated_at_ms = $3 WHERE id = $4 AND chunk_count = $5",
        )
        .bind(embedding_model)
        .bind(i64::from(embedding_dimensions))
        .bind(now_ms)
        .bind(document_id)
        .bind(to_i64(vectors.len() as u64))
        .execute(&mut *transaction)
        .await
        .map_err(StoreError::query(OPERATION))?
        .rows_affected();
        if updated == 0 {
            return Ok(false);
        }
        for (ordinal, vector) in vectors.iter().enumerate() {
            sqlx::query(
                "UPDATE knowledge_chunks SET vector = $1 WHERE document_id = $2 AND ordinal = $3",
            )
            .bind(vector_to_bytes(vector))
            .bind(document_id)
            .bind(to_i64(ordinal as u64))
            .execute(&mut *transaction)
            .await
            .map_err(StoreError::query(OPERATION))?;
        }
        transaction
            .commit()
            .await
            .map_err(StoreError::query(OPERATION))?;
        Ok(true)
    }
}

fn document_from_row(row: &AnyRow) -> Result<KnowledgeDocumentRecord, sqlx::Error> {
    let dimensions: i64 = row.try_get("embedding_dimensions")?;
    Ok(KnowledgeDocumentRecord {
        id: row.try_get("id")?,
        title: row.try_get("title")?,
        source: row.try_get("source")?,
        format: row.try_get("format")?,
        sha256: row.try_get("sha256")?,
        bytes: to_u64(row.try_get("bytes")?),
        chunk_count: to_u64(row.try_get("chunk_count")?),
        embedding_model: row.try_get("embedding_model")?,
        embedding_dimensions: u32::try_from(dimensions).map_err(|_| {
            decode_error("embedding_dimensions")(format!("{dimensions} is out of range"))
        })?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

fn chunk_from_row(row: &AnyRow) -> Result<KnowledgeChunkRecord, sqlx::Error> {
    let ordinal: i64 = row.try_get("ordinal")?;
    let bytes: Vec<u8> = row.try_get("vector")?;
    Ok(KnowledgeChunkRecord {
        document_id: row.try_get("document_id")?,
        ordinal: u32::try_from(ordinal)
            .map_err(|_| decode_error("ordinal")(format!("{ordinal} is out of range")))?,
        section: row.try_get("section")?,
        text: row.try_get("text")?,
        vector: vector_from_bytes(&bytes).ok_or_else(|| {
            decode_error("vector")(format!(
                "{} bytes is not a whole number of f32",
                bytes.len()
            ))
        })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_as_little_endian_bytes() {
        let vector = vec![1.0f32, -0.5, f32::MIN_POSITIVE, 3.25e7];
        let bytes = vector_to_bytes(&vector);
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[..4], &[0, 0, 0x80, 0x3f]);
        assert_eq!(vector_from_bytes(&bytes), Some(vector));
        assert_eq!(vector_from_bytes(&[0, 0, 0]), None);
        assert_eq!(vector_from_bytes(&[]), Some(vec![]));
    }
}
