//! Go's `crypto/tls` in an executable (docs/plaintext.md, "Go"): where
//! `crypto/tls.(*Conn).Write` and `crypto/tls.(*Conn).Read` start and
//! every place they return, for uprobes by file offset.
//!
//! Go moves goroutine stacks, so a uretprobe (which rewrites the return
//! address on the stack) can break the program: the returns are probed
//! instead, at each `RET` instruction of the function's code, found by
//! decoding it (`iced-x86`) from its start to its `st_size`. The symbols
//! come from `.symtab` (`crate::capture::elf`): a stripped Go binary
//! (`-ldflags=-s`) has none and stays invisible. x86-64 only, and Go's
//! register ABI (Go 1.17 and later); an older Go passes arguments on the
//! stack and would be read wrong, so the binary's Go version is not
//! checked here but the agent's programs read registers only.
//!
//! Who can change the input: whoever writes the executable (the
//! workload's image); wrong offsets put uprobes in that process only.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};

use crate::capture::elf::{ElfError, Source};

/// The functions, in the order of [`GoTls::functions`]: the write first.
pub const FUNCTIONS: [&str; 2] = ["crypto/tls.(*Conn).Write", "crypto/tls.(*Conn).Read"];

/// The most code read of one function (Write and Read are ~1–2 KiB).
pub const MAX_FUNCTION: u64 = 64 * 1024;
/// The most returns probed in one function.
pub const MAX_RETURNS: usize = 32;

/// Where to probe one function: its entry and each return (file offsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probes {
    pub entry: u64,
    pub returns: Vec<u64>,
}

/// Go's `crypto/tls` in a file: `[write, read]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoTls {
    pub functions: [Probes; 2],
}

/// The probes of the two [`FUNCTIONS`] of `src`, given their (file
/// offset, size) as `crate::capture::elf::find_function_ranges` found them.
pub fn at<S: Source + ?Sized>(
    src: &S,
    write: (u64, u64),
    read: (u64, u64),
) -> Result<GoTls, ElfError> {
    Ok(GoTls {
        functions: [probes(src, write)?, probes(src, read)?],
    })
}

fn probes<S: Source + ?Sized>(src: &S, (offset, size): (u64, u64)) -> Result<Probes, ElfError> {
    if size == 0 || size > MAX_FUNCTION {
        return Err(ElfError::Malformed("a Go TLS function of no or huge size"));
    }
    let mut code = vec![0u8; size as usize];
    src.read_exact_at(&mut code, offset)?;
    let returns = returns_in(&code)
        .into_iter()
        .map(|at| offset + at)
        .collect::<Vec<_>>();
    if returns.is_empty() || returns.len() > MAX_RETURNS {
        return Err(ElfError::Malformed(
            "a Go TLS function with no or too many returns",
        ));
    }
    Ok(Probes {
        entry: offset,
        returns,
    })
}

/// The offsets of the `RET` instructions in x86-64 `code`, decoded from
/// its start (bytes that do not decode are skipped one by one, as the
/// decoder does).
pub fn returns_in(code: &[u8]) -> Vec<u64> {
    Decoder::with_ip(64, code, 0, DecoderOptions::NONE)
        .into_iter()
        .filter(|i| i.mnemonic() == Mnemonic::Ret)
        .map(|i| i.ip())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_are_instructions_not_bytes() {
        // mov eax, 0xc3c3c3c3; ret; nop; lea rax, [rip+0xc3]; ret 8
        let code = [
            0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0x90, 0x48, 0x8d, 0x05, 0xc3, 0x00, 0x00, 0x00,
            0xc2, 0x08, 0x00,
        ];
        assert_eq!(returns_in(&code), [5, 14]);
        assert!(returns_in(&[]).is_empty());
        // Garbage never panics.
        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 131 % 251) as u8).collect();
        let _ = returns_in(&junk);
    }

    #[test]
    fn functions_without_code_or_returns_are_refused() {
        let code = [0x90u8; 64];
        assert_eq!(
            at(&code[..], (0, 0), (0, 8)),
            Err(ElfError::Malformed("a Go TLS function of no or huge size"))
        );
        // Nops only: no return to probe.
        assert_eq!(
            at(&code[..], (0, 8), (8, 8)),
            Err(ElfError::Malformed(
                "a Go TLS function with no or too many returns"
            ))
        );
        let mut code = code;
        code[5] = 0xc3;
        code[12] = 0xc3;
        let go = at(&code[..], (0, 8), (8, 8)).unwrap();
        assert_eq!(
            go.functions[0],
            Probes {
                entry: 0,
                returns: vec![5]
            }
        );
        assert_eq!(
            go.functions[1],
            Probes {
                entry: 8,
                returns: vec![12]
            }
        );
        // Code past the end of the file is an error, not a panic.
        assert!(at(&code[..], (60, 8), (0, 8)).is_err());
    }
}
