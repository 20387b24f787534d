//! The knowledge base's documents and chunks.

use medbox_store::{KnowledgeInsert, NewKnowledgeChunk, NewKnowledgeDocument};

use crate::support::TestDb;

on_both_backends!(
    documents_round_trip_with_their_vectors,
    the_same_text_is_stored_once,
    re_embedding_replaces_every_vector,
    deleting_a_document_deletes_its_chunks,
);

fn document(sha: &str, chunks: u32) -> NewKnowledgeDocument {
    NewKnowledgeDocument {
        title: "成人高血压 / Hypertension".to_owned(),
        source: "guidelines/hypertension.md".to_owned(),
        format: "markdown".to_owned(),
        sha256: sha.repeat(64 / sha.len()),
        bytes: 4_321,
        embedding_model: "minilm".to_owned(),
        embedding_dimensions: 3,
        chunks: (0..chunks)
            .map(|ordinal| NewKnowledgeChunk {
                ordinal,
                section: format!("治疗 > Step {ordinal}"),
                text: format!("第{ordinal}段：start low, go slow."),
                vector: vec![ordinal as f32, -0.25, f32::EPSILON],
            })
            .collect(),
    }
}

async fn documents_round_trip_with_their_vectors(db: &TestDb) {
    let store = db.open().await;
    let new = document("a1", 3);
    let inserted = match store.insert_knowledge_document(&new, 1_000).await.unwrap() {
        KnowledgeInsert::Inserted(record) => record,
        other => panic!("expected a new document, got {other:?}"),
    };
    assert!(inserted.id.starts_with("kd_") && inserted.id.len() == 15);
    assert_eq!(
        (
            inserted.title.as_str(),
            inserted.source.as_str(),
            inserted.format.as_str(),
            inserted.sha256.as_str(),
            inserted.bytes,
            inserted.chunk_count,
            inserted.embedding_model.as_str(),
            inserted.embedding_dimensions,
            inserted.created_at_ms,
            inserted.updated_at_ms,
        ),
        (
            new.title.as_str(),
            new.source.as_str(),
            "markdown",
            new.sha256.as_str(),
            4_321,
            3,
            "minilm",
            3,
            1_000,
            1_000
        )
    );
    let chunks = store.knowledge_chunks(&inserted.id).await.unwrap();
    assert_eq!(chunks.len(), 3);
    for (chunk, expected) in chunks.iter().zip(&new.chunks) {
        assert_eq!(chunk.document_id, inserted.id);
        assert_eq!(chunk.ordinal, expected.ordinal);
        assert_eq!(chunk.section, expected.section);
        assert_eq!(chunk.text, expected.text);
        assert_eq!(chunk.vector, expected.vector, "bit-exact vectors");
    }
    assert_eq!(
        store.get_knowledge_document(&inserted.id).await.unwrap(),
        Some(inserted.clone())
    );
    assert_eq!(store.get_knowledge_document("kd_nope").await.unwrap(), None);
    store
        .insert_knowledge_document(&document("b2", 1), 2_000)
        .await
        .unwrap();
    let listed = store.list_knowledge_documents().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0], inserted, "oldest first");
    store.close().await;
}

async fn the_same_text_is_stored_once(db: &TestDb) {
    let store = db.open().await;
    let first = store
        .insert_knowledge_document(&document("c3", 2), 1_000)
        .await
        .unwrap();
    let mut again = document("c3", 5);
    again.title = "another title".to_owned();
    let second = store
        .insert_knowledge_document(&again, 2_000)
        .await
        .unwrap();
    assert!(matches!(first, KnowledgeInsert::Inserted(_)));
    assert_eq!(
        second,
        KnowledgeInsert::AlreadyPresent(first.record().clone())
    );
    assert_eq!(store.list_knowledge_documents().await.unwrap().len(), 1);
    assert_eq!(
        store
            .find_knowledge_document_by_sha256(&"c3".repeat(32))
            .await
            .unwrap()
            .map(|record| record.id),
        Some(first.record().id.clone())
    );
    // Two writers with the same text at once: one document.
    let racing = document("d4", 4);
    let (left, right) = tokio::join!(
        store.insert_knowledge_document(&racing, 3_000),
        store.insert_knowledge_document(&racing, 3_000)
    );
    assert_eq!(left.unwrap().record().id, right.unwrap().record().id);
    assert_eq!(store.list_knowledge_documents().await.unwrap().len(), 2);
    store.close().await;
}

async fn re_embedding_replaces_every_vector(db: &TestDb) {
    let store = db.open().await;
    let id = store
        .insert_knowledge_document(&document("e5", 2), 1_000)
        .await
        .unwrap()
        .record()
        .id
        .clone();
    let vectors = vec![vec![0.5f32; 4], vec![-0.5f32; 4]];
    assert!(
        store
            .replace_knowledge_vectors(&id, "bge-small", 4, &vectors, 5_000)
            .await
            .unwrap()
    );
    let record = store.get_knowledge_document(&id).await.unwrap().unwrap();
    assert_eq!(
        (
            record.embedding_model.as_str(),
            record.embedding_dimensions,
            record.updated_at_ms
        ),
        ("bge-small", 4, 5_000)
    );
    let stored: Vec<Vec<f32>> = store
        .knowledge_chunks(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|chunk| chunk.vector)
        .collect();
    assert_eq!(stored, vectors);
    // A count that does not match, or no document: nothing changes.
    assert!(
        !store
            .replace_knowledge_vectors(&id, "x", 4, &vectors[..1], 6_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .replace_knowledge_vectors("kd_nope", "x", 4, &vectors, 6_000)
            .await
            .unwrap()
    );
    store.close().await;
}

async fn deleting_a_document_deletes_its_chunks(db: &TestDb) {
    let store = db.open().await;
    let id = store
        .insert_knowledge_document(&document("f6", 3), 1_000)
        .await
        .unwrap()
        .record()
        .id
        .clone();
    assert!(store.delete_knowledge_document(&id).await.unwrap());
    assert!(!store.delete_knowledge_document(&id).await.unwrap());
    assert!(store.knowledge_chunks(&id).await.unwrap().is_empty());
    assert!(store.list_knowledge_documents().await.unwrap().is_empty());
    // The same text may be added again after a delete.
    let again = store
        .insert_knowledge_document(&document("f6", 3), 2_000)
        .await
        .unwrap();
    assert!(matches!(again, KnowledgeInsert::Inserted(_)));
    store.close().await;
}
