//! `medboxctl knowledge add FILE… | list | search QUERY | delete ID`: the
//! knowledge base the agents cite (guidelines, hospital protocols).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use medbox_proto::v1 as pb;
use serde_json::json;

use crate::{Client, grpc_error};

#[derive(Subcommand)]
pub enum KnowledgeCommand {
    /// Adds documents (markdown or plain text, UTF-8); each is chunked and
    /// embedded before the command returns. Adding a file again changes nothing.
    Add {
        /// One or more files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The title (one file only); default: the document's only `# heading`,
        /// else the file name.
        #[arg(long)]
        title: Option<String>,
        /// markdown or text; default: text for .txt files, else markdown.
        #[arg(long)]
        format: Option<String>,
    },
    /// The stored documents and the size of the search index.
    List,
    /// Searches the knowledge base as the agents do; prints the passages with
    /// their citations.
    Search {
        query: String,
        /// Passages to show, 1 to 50.
        #[arg(long, default_value_t = 5)]
        limit: u32,
        /// hybrid (default), vector or keyword.
        #[arg(long, default_value = "hybrid")]
        mode: String,
    },
    /// Removes a document and its passages.
    Delete { id: String },
}

pub async fn knowledge(
    client: &Client,
    command: &KnowledgeCommand,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut knowledge = pb::knowledge_client::KnowledgeClient::new(client.channel.clone())
        .max_decoding_message_size(16 << 20);
    match command {
        KnowledgeCommand::Add {
            files,
            title,
            format,
        } => {
            if title.is_some() && files.len() > 1 {
                bail!("--title names one document; give one file with it");
            }
            for (index, path) in files.iter().enumerate() {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read {} (a UTF-8 text file)", path.display())
                })?;
                let format = format.clone().unwrap_or_else(|| {
                    let plain = path.extension().is_some_and(|extension| extension == "txt");
                    if plain { "text" } else { "markdown" }.to_owned()
                });
                let source = path
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !as_json {
                    eprintln!(
                        "[{}/{}] {}: chunking and embedding…",
                        index + 1,
                        files.len(),
                        path.display()
                    );
                }
                let response = knowledge
                    .add_document(client.request(pb::AddDocumentRequest {
                        title: title.clone().unwrap_or_default(),
                        source,
                        text,
                        format,
                    }))
                    .await
                    .map_err(grpc_error)
                    .with_context(|| format!("adding {}", path.display()))?
                    .into_inner();
                let document = response.document.unwrap_or_default();
                if as_json {
                    let mut value = document_json(&document);
                    value["already_present"] = json!(response.already_present);
                    println!("{value}");
                } else if response.already_present {
                    println!(
                        "{}  already stored as {} ({}); nothing changed",
                        path.display(),
                        document.id,
                        document.title
                    );
                } else {
                    println!(
                        "{}  added as {}: \"{}\", {} passages",
                        path.display(),
                        document.id,
                        document.title,
                        document.chunk_count
                    );
                }
            }
            Ok(())
        }
        KnowledgeCommand::List => {
            let listed = knowledge
                .list_documents(client.request(pb::ListDocumentsRequest {}))
                .await
                .map_err(grpc_error)?
                .into_inner();
            if as_json {
                for document in &listed.documents {
                    println!("{}", document_json(document));
                }
                return Ok(());
            }
            println!(
                "{:<16} {:>8} {:<24} {:<40} TITLE",
                "ID", "PASSAGES", "SOURCE", "EMBEDDED BY"
            );
            for document in &listed.documents {
                println!(
                    "{:<16} {:>8} {:<24} {:<40} {}",
                    document.id,
                    document.chunk_count,
                    document.source,
                    format!(
                        "{} ({} dims)",
                        document.embedding_model, document.embedding_dimensions
                    ),
                    document.title
                );
            }
            println!(
                "{} documents, {} passages in the search index{}",
                listed.documents.len(),
                listed.indexed_chunks,
                if listed.ingesting {
                    " (still ingesting the knowledge folder)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        KnowledgeCommand::Search { query, limit, mode } => {
            let found = knowledge
                .search(client.request(pb::KnowledgeSearchRequest {
                    query: query.clone(),
                    limit: *limit,
                    mode: mode.clone(),
                }))
                .await
                .map_err(grpc_error)?
                .into_inner();
            for (rank, passage) in found.passages.iter().enumerate() {
                if as_json {
                    println!(
                        "{}",
                        json!({
                            "rank": rank + 1, "citation": passage.citation,
                            "document_id": passage.document_id, "title": passage.title,
                            "source": passage.source, "section": passage.section,
                            "ordinal": passage.ordinal, "score": passage.score,
                            "vector_rank": passage.vector_rank, "keyword_rank": passage.keyword_rank,
                            "text": passage.text,
                        })
                    );
                } else {
                    println!(
                        "{}. {}  [{}, score {:.4}]\n{}\n",
                        rank + 1,
                        passage.citation,
                        passage.document_id,
                        passage.score,
                        passage.text.trim()
                    );
                }
            }
            if found.passages.is_empty() && !as_json {
                println!("no passage found");
            }
            Ok(())
        }
        KnowledgeCommand::Delete { id } => {
            knowledge
                .delete_document(client.request(pb::DeleteDocumentRequest { id: id.clone() }))
                .await
                .map_err(grpc_error)?;
            if as_json {
                println!("{}", json!({"id": id, "deleted": true}));
            } else {
                println!("deleted {id}");
            }
            Ok(())
        }
    }
}

fn document_json(document: &pb::KnowledgeDocument) -> serde_json::Value {
    json!({
        "id": document.id, "title": document.title, "source": document.source,
        "format": document.format, "sha256": document.sha256, "bytes": document.bytes,
        "chunk_count": document.chunk_count, "embedding_model": document.embedding_model,
        "embedding_dimensions": document.embedding_dimensions, "created_at": document.created_at,
    })
}
