//! The Gemini API of the fake providers (src/fake_provider.rs):
//! `POST /v1beta/models/MODEL:generateContent` and
//! `:streamGenerateContent?alt=sse`, with `usageMetadata` as Google sends
//! it. Prompt counts are cl100k_base tokens of the parts' text (Gemini's
//! tokenizer is not public: a stand-in, like Anthropic's).

use std::io::Write;

use serde_json::{Value, json};

use crate::{
    fake_provider::{
        Endpoint, Flavor, Options, Rng, Served, Usage, completion, end_stream, fnv, start_stream,
        text_of, write_chunk, write_response,
    },
    fake_shape::Out,
};

/// The model and whether it streams, for a generateContent path.
pub fn method(path: &str) -> Option<(String, bool)> {
    let path = path.split('?').next()?;
    let rest = path.strip_prefix("/v1beta/models/")?;
    let (model, method) = rest.rsplit_once(':')?;
    match method {
        "generateContent" => Some((model.to_string(), false)),
        "streamGenerateContent" => Some((model.to_string(), true)),
        _ => None,
    }
}

fn prompt_tokens(body: &Value) -> u64 {
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let contents = body["contents"].as_array().cloned().unwrap_or_default();
    contents
        .iter()
        .map(|c| {
            let parts = c["parts"].as_array().cloned().unwrap_or_default();
            parts
                .iter()
                .map(|p| bpe.encode_ordinary(&text_of(&p["text"])).len() as u64)
                .sum::<u64>()
        })
        .sum()
}

fn usage_metadata(prompt: u64, candidates: u64) -> Value {
    json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]
    })
}

/// Answers one generateContent request.
pub fn respond(
    s: &mut Out<'_>,
    opts: Options,
    path: &str,
    body: &Value,
    raw: &[u8],
) -> std::io::Result<Option<Served>> {
    let Some((model, streamed)) = method(path) else {
        return Ok(None);
    };
    let mut rng = Rng::new(fnv(raw));
    let prompt = prompt_tokens(body);
    let n = body["generationConfig"]["maxOutputTokens"]
        .as_u64()
        .unwrap_or(16) as usize;
    let pieces = completion(rng.next_u64(), n, tiktoken_rs::cl100k_base_singleton());
    let usage = Usage {
        prompt,
        completion: pieces.len() as u64,
    };
    let response_id = rng.alnum(22);
    if streamed {
        start_stream(s, Flavor::Gemini, &mut rng)?;
        for (i, piece) in pieces.iter().enumerate() {
            std::thread::sleep(opts.token_interval);
            let mut c = json!({
                "candidates": [{"content": {"parts": [{"text": piece}], "role": "model"}}],
                "usageMetadata": usage_metadata(prompt, i as u64 + 1),
                "modelVersion": model,
                "responseId": response_id
            });
            if i + 1 == pieces.len() {
                c["candidates"][0]["finishReason"] = json!("STOP");
            }
            write_chunk(s, &format!("data: {c}\r\n\r\n"))?;
        }
        end_stream(s)?;
    } else {
        std::thread::sleep(opts.token_interval * pieces.len() as u32);
        let out = json!({
            "candidates": [{
                "content": {"parts": [{"text": pieces.concat()}], "role": "model"},
                "finishReason": "STOP",
                "avgLogprobs": -0.21
            }],
            "usageMetadata": usage_metadata(prompt, usage.completion),
            "modelVersion": model,
            "responseId": response_id
        });
        let text = serde_json::to_string_pretty(&out).unwrap_or_default();
        write_response(s, Flavor::Gemini, 200, "application/json", &text)?;
    }
    s.flush()?;
    Ok(Some(Served {
        request_id: None,
        endpoint: Endpoint::GenerateContent,
        model,
        streamed,
        usage,
        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            method("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"),
            Some(("gemini-2.0-flash".into(), true))
        );
        assert_eq!(
            method("/v1beta/models/gemini-2.5-pro:generateContent"),
            Some(("gemini-2.5-pro".into(), false))
        );
        assert_eq!(method("/v1beta/models/x:countTokens"), None);
        assert_eq!(method("/v1/chat/completions"), None);
    }
}
