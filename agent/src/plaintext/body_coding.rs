//! Content codings of HTTP bodies (`Content-Encoding: gzip | deflate | br |
//! zstd`), decoded as a stream into a consumer, with a cap on the decoded
//! size (docs/exact-tokens.md, "Compressed bodies").
//!
//! The decoders write into a [`Capped`] writer that hands each decoded
//! piece to the consumer at once: no decoded body is kept. A body that
//! decodes to more than the cap (a decompression bomb, or simply a huge
//! response) stops being decoded at the cap and is reported `Bomb`; a body
//! that is not valid in its coding is reported `Corrupt`. The memory of a
//! decoder is its window: 32 KiB for gzip/deflate, up to 16 MiB for br (the
//! stream says), at most 8 MiB for zstd (`ZSTD_WINDOW_LOG`).

use std::io::{self, Write};

/// Default cap on a body's decoded size.
pub const MAX_DECODED: u64 = 64 * 1024 * 1024;
/// zstd frames with a larger window are refused (8 MiB).
const ZSTD_WINDOW_LOG: u32 = 23;
/// brotli's internal buffer.
const BROTLI_BUFFER: usize = 4096;

/// What consumes decoded bytes.
pub trait Consumer {
    fn consume(&mut self, data: &[u8]);
}

/// A content coding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    /// The coding of a `Content-Encoding` value (lower case); None: one
    /// the agent does not decode (several codings, compress, …).
    pub fn parse(value: &str) -> Option<Coding> {
        match value.trim() {
            "" | "identity" => Some(Coding::Identity),
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            "br" => Some(Coding::Brotli),
            "zstd" => Some(Coding::Zstd),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Identity => "identity",
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// Why decoding stopped before the body's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The decoded size passed the cap.
    Bomb,
    /// Not valid in its coding (or a zstd window over 8 MiB).
    Corrupt,
}

/// The writer the decoders write into: counts, caps, hands on.
pub struct Capped<C> {
    pub inner: C,
    pub decoded: u64,
    cap: u64,
    pub over: bool,
}

impl<C: Consumer> Write for Capped<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.cap.saturating_sub(self.decoded);
        if buf.len() as u64 > room {
            self.inner.consume(&buf[..room as usize]);
            self.decoded = self.cap;
            self.over = true;
            return Err(io::Error::other("decoded size over the cap"));
        }
        self.inner.consume(buf);
        self.decoded += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Dec<C: Consumer> {
    Identity(Capped<C>),
    Gzip(flate2::write::GzDecoder<Capped<C>>),
    Deflate(flate2::write::ZlibDecoder<Capped<C>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Capped<C>>>),
    Zstd(zstd::stream::write::Decoder<'static, Capped<C>>),
}

/// The decoder of one body.
pub struct Decoder<C: Consumer> {
    dec: Dec<C>,
    pub error: Option<DecodeError>,
    /// Encoded bytes written.
    pub encoded: u64,
}

impl<C: Consumer> Decoder<C> {
    pub fn new(coding: Coding, consumer: C, cap: u64) -> Self {
        let sink = Capped {
            inner: consumer,
            decoded: 0,
            cap,
            over: false,
        };
        let mut error = None;
        let dec = match coding {
            Coding::Identity => Dec::Identity(sink),
            Coding::Gzip => Dec::Gzip(flate2::write::GzDecoder::new(sink)),
            Coding::Deflate => Dec::Deflate(flate2::write::ZlibDecoder::new(sink)),
            Coding::Brotli => Dec::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(
                sink,
                BROTLI_BUFFER,
            ))),
            Coding::Zstd => match zstd::stream::raw::Decoder::new() {
                Ok(mut raw) => {
                    if raw
                        .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(ZSTD_WINDOW_LOG))
                        .is_err()
                    {
                        error = Some(DecodeError::Corrupt);
                    }
                    Dec::Zstd(zstd::stream::write::Decoder::with_decoder(sink, raw))
                }
                // No zstd context (out of memory): the body is not read.
                Err(_) => {
                    error = Some(DecodeError::Corrupt);
                    Dec::Identity(sink)
                }
            },
        };
        Self {
            dec,
            error,
            encoded: 0,
        }
    }

    fn sink(&mut self) -> &mut Capped<C> {
        match &mut self.dec {
            Dec::Identity(s) => s,
            Dec::Gzip(d) => d.get_mut(),
            Dec::Deflate(d) => d.get_mut(),
            Dec::Brotli(d) => d.get_mut(),
            Dec::Zstd(d) => d.get_mut(),
        }
    }

    /// The consumer (to read or take what it found so far).
    pub fn consumer(&mut self) -> &mut C {
        &mut self.sink().inner
    }

    /// Decoded bytes so far.
    pub fn decoded(&mut self) -> u64 {
        self.sink().decoded
    }

    /// Decodes the next encoded bytes; after an error, ignores them.
    pub fn write(&mut self, data: &[u8]) {
        self.encoded += data.len() as u64;
        if self.error.is_some() {
            return;
        }
        let r = match &mut self.dec {
            Dec::Identity(s) => s.write_all(data),
            Dec::Gzip(d) => d.write_all(data),
            Dec::Deflate(d) => d.write_all(data),
            Dec::Brotli(d) => d.write_all(data),
            Dec::Zstd(d) => d.write_all(data),
        };
        if r.is_err() {
            self.fail();
        }
    }

    fn fail(&mut self) {
        self.error = Some(if self.sink().over {
            DecodeError::Bomb
        } else {
            DecodeError::Corrupt
        });
    }

    /// The body ended: flushes what the decoder still holds. A stream that
    /// is cut short is `Corrupt` for gzip and deflate; br and zstd say
    /// nothing about a missing end.
    pub fn finish(&mut self) {
        if self.error.is_some() {
            return;
        }
        let r = match &mut self.dec {
            Dec::Identity(_) => Ok(()),
            Dec::Gzip(d) => d.try_finish(),
            Dec::Deflate(d) => d.try_finish(),
            Dec::Brotli(d) => d.flush(),
            Dec::Zstd(d) => d.flush(),
        };
        if r.is_err() {
            self.fail();
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// `data` in `coding` (test vectors for this module and exchange.rs).
    pub fn encode(coding: Coding, data: &[u8]) -> Vec<u8> {
        match coding {
            Coding::Identity => data.to_vec(),
            Coding::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).expect("gzip");
                e.finish().expect("gzip")
            }
            Coding::Deflate => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).expect("deflate");
                e.finish().expect("deflate")
            }
            Coding::Brotli => {
                let mut out = Vec::new();
                {
                    let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    e.write_all(data).expect("br");
                }
                out
            }
            Coding::Zstd => zstd::encode_all(data, 3).expect("zstd"),
        }
    }

    #[derive(Default)]
    struct Keep(Vec<u8>);
    impl Consumer for Keep {
        fn consume(&mut self, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    const ALL: [Coding; 5] = [
        Coding::Identity,
        Coding::Gzip,
        Coding::Deflate,
        Coding::Brotli,
        Coding::Zstd,
    ];

    fn decode(
        coding: Coding,
        encoded: &[u8],
        piece: usize,
        cap: u64,
    ) -> (Vec<u8>, Option<DecodeError>) {
        let mut d = Decoder::new(coding, Keep::default(), cap);
        for p in encoded.chunks(piece.max(1)) {
            d.write(p);
        }
        d.finish();
        (std::mem::take(&mut d.consumer().0), d.error)
    }

    #[test]
    fn every_coding_in_any_pieces() {
        let body: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("{{\"n\":{i}}}\n").into_bytes())
            .collect();
        for coding in ALL {
            let enc = encode(coding, &body);
            for piece in [1, 7, 1000, enc.len()] {
                assert_eq!(
                    decode(coding, &enc, piece, MAX_DECODED),
                    (body.clone(), None),
                    "{coding:?}/{piece}"
                );
            }
            assert_eq!(Coding::parse(coding.as_str()), Some(coding));
        }
        assert_eq!(Coding::parse("gzip, br"), None);
    }

    #[test]
    fn bombs_stop_at_the_cap() {
        let zeros = vec![0u8; 8 * 1024 * 1024];
        for coding in ALL {
            let enc = encode(coding, &zeros);
            let (got, err) = decode(coding, &enc, 4096, 1024 * 1024);
            assert_eq!(err, Some(DecodeError::Bomb), "{coding:?}");
            assert_eq!(got.len(), 1024 * 1024, "{coding:?}");
        }
    }

    #[test]
    fn corrupt_and_cut_bodies() {
        let body = b"{\"usage\":{\"prompt_tokens\":1}}".repeat(100);
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd] {
            let (_, err) = decode(
                coding,
                b"this is not compressed at all, not at all",
                5,
                MAX_DECODED,
            );
            assert_eq!(err, Some(DecodeError::Corrupt), "{coding:?}");
            let enc = encode(coding, &body);
            // Cut short: whatever came out is a prefix of the body, never a panic.
            let (got, _) = decode(coding, &enc[..enc.len() / 2], 3, MAX_DECODED);
            assert!(body.starts_with(&got), "{coding:?}");
        }
        let enc = encode(Coding::Gzip, &body);
        assert_eq!(
            decode(Coding::Gzip, &enc[..enc.len() - 4], 3, MAX_DECODED).1,
            Some(DecodeError::Corrupt)
        );
    }
}
