//! Converts a CTranslate2 Whisper model (as shipped by faster-whisper) to the
//! ggml file format that whisper.cpp loads.
//!
//! Input: a directory with `model.bin` (CTranslate2 format version 6,
//! little-endian), `config.json` and `vocabulary.txt` (one GPT-2 byte-level
//! token per line). Output: whisper.cpp's ggml file —
//!
//! ```text
//! u32 magic 0x67676d6c ("ggml")
//! i32 × 11 hparams: n_vocab, n_audio_ctx, n_audio_state, n_audio_head,
//!      n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer,
//!      n_mels, ftype (1 = f16)
//! i32 n_mels, i32 n_fft/2+1, f32[n_mels × (n_fft/2+1)]  mel filterbank
//! i32 n_tokens, then per token: i32 length, bytes     vocabulary 0..eot
//! per tensor: i32 n_dims, i32 name length, i32 type (0 f32, 1 f16),
//!      i32 dims (innermost first), name, data
//! ```
//!
//! The mel filterbank is librosa's `mel(sr=16000, n_fft=400, n_mels=80)`
//! (Slaney scale and area normalisation), computed here in f64 and stored as
//! f32 like openai-whisper's `mel_filters.npz`. Weights follow whisper.cpp's
//! own converter: 1-D tensors, conv biases (as `(n, 1)`) and positional
//! embeddings in f32, 2-D and 3-D weights in f16. CTranslate2 fuses
//! attention projections (Q,K,V for self-attention; K,V for cross-attention)
//! and stores a key bias of zeros that ggml does not have: the converter
//! splits the first, checks the second is zero and drops it. The output
//! projection is tied to the token embedding (a CTranslate2 alias), so it is
//! not written. The output is a pure function of the input: converting twice
//! gives the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::Error;

/// Files a CTranslate2 Whisper model directory must hold.
pub const SOURCE_FILES: [&str; 3] = ["model.bin", "config.json", "vocabulary.txt"];

/// whisper.cpp's file magic ("ggml" as a little-endian u32).
pub const GGML_MAGIC: u32 = 0x6767_6d6c;

const SAMPLE_RATE: f64 = 16_000.0;
const N_FFT: usize = 400;

/// Whisper's hyper-parameters, in the order of the ggml header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hparams {
    pub n_vocab: i32,
    pub n_audio_ctx: i32,
    pub n_audio_state: i32,
    pub n_audio_head: i32,
    pub n_audio_layer: i32,
    pub n_text_ctx: i32,
    pub n_text_state: i32,
    pub n_text_head: i32,
    pub n_text_layer: i32,
    pub n_mels: i32,
    /// 0 = all f32, 1 = big weights in f16.
    pub ftype: i32,
}

impl Hparams {
    fn to_array(self) -> [i32; 11] {
        [
            self.n_vocab,
            self.n_audio_ctx,
            self.n_audio_state,
            self.n_audio_head,
            self.n_audio_layer,
            self.n_text_ctx,
            self.n_text_state,
            self.n_text_head,
            self.n_text_layer,
            self.n_mels,
            self.ftype,
        ]
    }

    fn from_array(a: [i32; 11]) -> Self {
        Hparams {
            n_vocab: a[0],
            n_audio_ctx: a[1],
            n_audio_state: a[2],
            n_audio_head: a[3],
            n_audio_layer: a[4],
            n_text_ctx: a[5],
            n_text_state: a[6],
            n_text_head: a[7],
            n_text_layer: a[8],
            n_mels: a[9],
            ftype: a[10],
        }
    }

    /// How many tensors whisper.cpp expects for these hparams.
    pub fn expected_tensors(&self) -> usize {
        // encoder: positional embedding, 2 convs (w, b), ln_post (w, b);
        // per layer 15. decoder: positional + token embedding, ln (w, b);
        // per layer 24 (self-attention 9 + cross-attention 9 + mlp 6).
        7 + 15 * self.n_audio_layer.max(0) as usize + 4 + 24 * self.n_text_layer.max(0) as usize
    }
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub hparams: Hparams,
    pub tensors: usize,
    pub vocab_tokens: usize,
    pub bytes: u64,
    /// sha256 of the written file.
    pub sha256: String,
}

/// A ggml Whisper file's header, read back (for checks and tests).
#[derive(Debug, Clone)]
pub struct GgmlSummary {
    pub hparams: Hparams,
    pub mel_filters: (i32, i32),
    pub vocab_tokens: usize,
    /// Tensor names with their dims (innermost first) and type (0 f32, 1 f16).
    pub tensors: Vec<(String, Vec<i32>, i32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl DType {
    fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            0 => DType::F32,
            1 => DType::I8,
            2 => DType::I16,
            3 => DType::I32,
            4 => DType::F16,
            5 => DType::Bf16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            DType::I8 => 1,
            DType::I16 | DType::F16 | DType::Bf16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::Bf16)
    }
}

#[derive(Debug, Clone)]
struct Variable {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    offset: u64,
    nbytes: u64,
}

/// The index of a CTranslate2 `model.bin`: variable names, shapes and where
/// their data lies (the data is read on demand).
struct Ct2Model {
    path: PathBuf,
    file: BufReader<File>,
    vars: Vec<Variable>,
    by_name: HashMap<String, usize>,
    aliases: Vec<(String, String)>,
    len: u64,
}

fn convert_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Convert(format!("{}: {msg}", path.display()))
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |error| Error::File {
        path,
        action,
        error,
    }
}

impl Ct2Model {
    fn open(path: &Path) -> Result<Ct2Model, Error> {
        let f = File::open(path).map_err(io_err(path, "open the CTranslate2 model"))?;
        let len = f
            .metadata()
            .map_err(io_err(path, "read the CTranslate2 model"))?
            .len();
        let mut r = Reader {
            inner: BufReader::new(f),
            path: path.to_path_buf(),
            pos: 0,
            len,
        };
        let version = r.u32()?;
        if version != 6 {
            return Err(convert_err(
                path,
                format!("CTranslate2 model format version {version}; only version 6 is supported"),
            ));
        }
        let spec = r.string()?;
        if spec != "WhisperSpec" {
            return Err(convert_err(
                path,
                format!("model spec {spec:?} is not a Whisper model (WhisperSpec)"),
            ));
        }
        let _revision = r.u32()?;
        let n = r.u32()? as usize;
        let mut vars = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let name = r.string()?;
            let rank = r.u8()? as usize;
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(r.u32()? as usize);
            }
            let code = r.u8()?;
            let dtype = DType::from_code(code)
                .ok_or_else(|| convert_err(path, format!("{name}: unknown data type {code}")))?;
            let nbytes = u64::from(r.u32()?);
            let elements: usize = shape.iter().product();
            if elements as u64 * dtype.size() as u64 != nbytes {
                return Err(convert_err(
                    path,
                    format!(
                        "{name}: {nbytes} bytes do not hold shape {shape:?} of {dtype:?} (truncated or corrupt file?)"
                    ),
                ));
            }
            let offset = r.pos;
            r.skip(nbytes)?;
            vars.push(Variable {
                name,
                shape,
                dtype,
                offset,
                nbytes,
            });
        }
        let mut aliases = Vec::new();
        if r.pos < r.len {
            let n = r.u32()?;
            for _ in 0..n {
                let alias = r.string()?;
                let target = r.string()?;
                aliases.push((alias, target));
            }
        }
        let by_name = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
        Ok(Ct2Model {
            path: path.to_path_buf(),
            file: r.inner,
            vars,
            by_name,
            aliases,
            len,
        })
    }

    fn var(&self, name: &str) -> Result<&Variable, Error> {
        self.by_name
            .get(name)
            .map(|&i| &self.vars[i])
            .ok_or_else(|| convert_err(&self.path, format!("variable {name} is missing")))
    }

    fn read(&mut self, v: &Variable) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; v.nbytes as usize];
        self.file
            .seek(SeekFrom::Start(v.offset))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(io_err(&self.path, "read the CTranslate2 model"))?;
        Ok(buf)
    }

    /// An integer scalar such as `encoder/num_heads`.
    fn scalar(&mut self, name: &str) -> Result<i64, Error> {
        let v = self.var(name)?.clone();
        let data = self.read(&v)?;
        let value = match (v.dtype, data.as_slice()) {
            (DType::I8, [a]) => i64::from(*a as i8),
            (DType::I16, [a, b]) => i64::from(i16::from_le_bytes([*a, *b])),
            (DType::I32, [a, b, c, d]) => i64::from(i32::from_le_bytes([*a, *b, *c, *d])),
            _ => {
                return Err(convert_err(
                    &self.path,
                    format!("{name} is not an integer scalar"),
                ));
            }
        };
        Ok(value)
    }

    fn layers(&self, prefix: &str) -> usize {
        let mut n = 0;
        while self
            .by_name
            .contains_key(&format!("{prefix}/layer_{n}/ffn/layer_norm/gamma"))
        {
            n += 1;
        }
        n
    }
}

/// Little-endian reader that tracks its position and refuses to run past the
/// end of the file with a clear message.
struct Reader {
    inner: BufReader<File>,
    path: PathBuf,
    pos: u64,
    len: u64,
}

impl Reader {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(|_| {
            convert_err(
                &self.path,
                format!(
                    "unexpected end of file at byte {} (truncated or corrupt file?)",
                    self.pos
                ),
            )
        })?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.bytes()?))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    /// u16 length (including the NUL), bytes, NUL.
    fn string(&mut self) -> Result<String, Error> {
        let n = self.u16()? as usize;
        let mut b = vec![0u8; n];
        self.inner.read_exact(&mut b).map_err(|_| {
            convert_err(
                &self.path,
                "unexpected end of file in a name (truncated or corrupt file?)",
            )
        })?;
        self.pos += n as u64;
        if b.last() == Some(&0) {
            b.pop();
        }
        String::from_utf8(b).map_err(|_| convert_err(&self.path, "a name is not UTF-8"))
    }
    fn skip(&mut self, n: u64) -> Result<(), Error> {
        if self.pos + n > self.len {
            return Err(convert_err(
                &self.path,
                format!(
                    "data runs past the end of the file ({} > {} bytes; truncated download?)",
                    self.pos + n,
                    self.len
                ),
            ));
        }
        self.inner
            .seek_relative(n as i64)
            .map_err(io_err(&self.path, "read the CTranslate2 model"))?;
        self.pos += n;
        Ok(())
    }
}

/// How a CTranslate2 variable becomes ggml tensors.
enum Target {
    /// Skip (scalars and flags).
    Skip,
    /// One tensor.
    One(String),
    /// Fused projection: equal row blocks, in order; `None` blocks must be
    /// all zeros and are dropped (the attention key bias).
    Split(Vec<Option<String>>),
}

fn map_name(name: &str) -> Option<Target> {
    use Target::*;
    let (side, rest) = name.split_once('/')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let fixed = match rest {
        "conv1/weight" | "conv1/bias" | "conv2/weight" | "conv2/bias" => {
            Some(format!("{side}.{}", rest.replace('/', ".")))
        }
        "position_encodings/encodings" => Some(format!("{side}.positional_embedding")),
        "layer_norm/gamma" if side == "encoder" => Some("encoder.ln_post.weight".into()),
        "layer_norm/beta" if side == "encoder" => Some("encoder.ln_post.bias".into()),
        "layer_norm/gamma" => Some("decoder.ln.weight".into()),
        "layer_norm/beta" => Some("decoder.ln.bias".into()),
        "embeddings/weight" if side == "decoder" => Some("decoder.token_embedding.weight".into()),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(One(n));
    }
    let Some(layer_rest) = rest.strip_prefix("layer_") else {
        // Scalars and flags (num_heads, activation, alignment heads…).
        return Some(Skip);
    };
    let (idx, tail) = layer_rest.split_once('/')?;
    let idx: usize = idx.parse().ok()?;
    let b = format!("{side}.blocks.{idx}");
    let (module, param) = tail.rsplit_once('/')?;
    let param = match param {
        "gamma" | "weight" => "weight",
        "beta" | "bias" => "bias",
        _ => return None,
    };
    let bias = param == "bias";
    let t = match module {
        "self_attention/layer_norm" => One(format!("{b}.attn_ln.{param}")),
        "self_attention/linear_0" => Split(vec![
            Some(format!("{b}.attn.query.{param}")),
            (!bias).then(|| format!("{b}.attn.key.{param}")),
            Some(format!("{b}.attn.value.{param}")),
        ]),
        "self_attention/linear_1" => One(format!("{b}.attn.out.{param}")),
        "attention/layer_norm" if side == "decoder" => One(format!("{b}.cross_attn_ln.{param}")),
        "attention/linear_0" if side == "decoder" => One(format!("{b}.cross_attn.query.{param}")),
        "attention/linear_1" if side == "decoder" => Split(vec![
            (!bias).then(|| format!("{b}.cross_attn.key.{param}")),
            Some(format!("{b}.cross_attn.value.{param}")),
        ]),
        "attention/linear_2" if side == "decoder" => One(format!("{b}.cross_attn.out.{param}")),
        "ffn/layer_norm" => One(format!("{b}.mlp_ln.{param}")),
        "ffn/linear_0" => One(format!("{b}.mlp.0.{param}")),
        "ffn/linear_1" => One(format!("{b}.mlp.2.{param}")),
        _ => return None,
    };
    Some(t)
}

/// Converts the CTranslate2 Whisper model in `src_dir` to a ggml file at
/// `out`. Writes `out` with a `.partial` suffix first and renames it when
/// complete. `progress(done, total)` follows the bytes of `model.bin`.
pub fn convert_whisper_ct2(
    src_dir: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertReport, Error> {
    for f in SOURCE_FILES {
        let p = src_dir.join(f);
        if !p.is_file() {
            return Err(Error::Convert(format!(
                "{} is missing: a CTranslate2 Whisper model directory holds {}",
                p.display(),
                SOURCE_FILES.join(", ")
            )));
        }
    }
    let config_path = src_dir.join("config.json");
    let config = std::fs::read(&config_path).map_err(io_err(&config_path, "read"))?;
    serde_json::from_slice::<serde_json::Value>(&config)
        .map_err(|e| convert_err(&config_path, format!("not valid JSON: {e}")))?;

    let model_path = src_dir.join("model.bin");
    let mut model = Ct2Model::open(&model_path)?;
    let hparams = derive_hparams(&mut model)?;
    let vocab_path = src_dir.join("vocabulary.txt");
    let vocab = read_vocabulary(&vocab_path)?;

    for (alias, target) in &model.aliases {
        if alias == "decoder/projection/weight" && target != "decoder/embeddings/weight" {
            return Err(convert_err(
                &model_path,
                format!(
                    "the output projection is an alias of {target}, not of the token embedding; whisper.cpp ties them"
                ),
            ));
        }
    }

    let partial = partial_path(out);
    let file = File::create(&partial).map_err(io_err(&partial, "create"))?;
    let mut w = HashWriter::new(BufWriter::with_capacity(1 << 20, file), &partial);

    w.u32(GGML_MAGIC)?;
    for v in hparams.to_array() {
        w.i32(v)?;
    }
    let filters = mel_filters(SAMPLE_RATE, N_FFT, hparams.n_mels as usize);
    w.i32(hparams.n_mels)?;
    w.i32((N_FFT / 2 + 1) as i32)?;
    for f in &filters {
        w.write(&f.to_le_bytes())?;
    }
    w.i32(vocab.len() as i32)?;
    for token in &vocab {
        w.i32(token.len() as i32)?;
        w.write(token)?;
    }

    let total = model.len;
    let mut tensors = 0usize;
    let vars = model.vars.clone();
    for v in &vars {
        if v.name == "decoder/projection/weight" {
            // A real (not aliased) projection: whisper.cpp ties it to the
            // token embedding, so it must be identical.
            let emb = model.var("decoder/embeddings/weight")?.clone();
            if model.read(v)? != model.read(&emb)? {
                return Err(convert_err(
                    &model_path,
                    "the output projection differs from the token embedding; whisper.cpp ties them",
                ));
            }
            continue;
        }
        let target = map_name(&v.name).ok_or_else(|| {
            convert_err(
                &model_path,
                format!(
                    "unexpected variable {} (not a Whisper model this converter knows)",
                    v.name
                ),
            )
        })?;
        let names = match target {
            Target::Skip => {
                if !v.shape.is_empty() {
                    return Err(convert_err(
                        &model_path,
                        format!("unexpected tensor {} {:?}", v.name, v.shape),
                    ));
                }
                continue;
            }
            Target::One(n) => vec![Some(n)],
            Target::Split(parts) => parts,
        };
        if !v.dtype.is_float() {
            return Err(convert_err(
                &model_path,
                format!(
                    "{} is stored as {:?}: quantised CTranslate2 models are not supported; use a float16 or float32 export",
                    v.name, v.dtype
                ),
            ));
        }
        let data = model.read(v)?;
        let rows = v.shape.first().copied().unwrap_or(1);
        let n = names.len();
        if rows % n != 0 {
            return Err(convert_err(
                &model_path,
                format!(
                    "{} has {rows} rows, not divisible into {n} fused projections",
                    v.name
                ),
            ));
        }
        let block = data.len() / n;
        for (i, name) in names.iter().enumerate() {
            let bytes = &data[i * block..(i + 1) * block];
            let mut shape = v.shape.clone();
            if let Some(first) = shape.first_mut() {
                *first /= n;
            }
            let Some(name) = name else {
                if to_f32(bytes, v.dtype).iter().any(|x| *x != 0.0) {
                    return Err(convert_err(
                        &model_path,
                        format!(
                            "{}: the attention key bias is not zero; ggml Whisper has no key bias",
                            v.name
                        ),
                    ));
                }
                continue;
            };
            if name.ends_with("conv1.bias") || name.ends_with("conv2.bias") {
                shape.push(1);
            }
            // Judged on the CTranslate2 rank: conv biases are 1-D there.
            let f32_out = v.shape.len() < 2 || name.ends_with("positional_embedding");
            w.i32(shape.len() as i32)?;
            w.i32(name.len() as i32)?;
            w.i32(if f32_out { 0 } else { 1 })?;
            for d in shape.iter().rev() {
                w.i32(*d as i32)?;
            }
            w.write(name.as_bytes())?;
            if f32_out {
                let vals = to_f32(bytes, v.dtype);
                let mut out = Vec::with_capacity(vals.len() * 4);
                for x in vals {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                w.write(&out)?;
            } else if v.dtype == DType::F16 {
                w.write(bytes)?;
            } else {
                let vals = to_f32(bytes, v.dtype);
                let mut out = Vec::with_capacity(vals.len() * 2);
                for x in vals {
                    out.extend_from_slice(&f32_to_f16(x).to_le_bytes());
                }
                w.write(&out)?;
            }
            tensors += 1;
        }
        progress(v.offset + v.nbytes, total);
    }
    let expected = hparams.expected_tensors();
    if tensors != expected {
        return Err(convert_err(
            &model_path,
            format!("wrote {tensors} tensors but whisper.cpp expects {expected} for these hparams"),
        ));
    }
    let (bytes, sha256) = w.finish()?;
    std::fs::rename(&partial, out).map_err(io_err(out, "rename the converted model into place"))?;
    progress(total, total);
    Ok(ConvertReport {
        hparams,
        tensors,
        vocab_tokens: vocab.len(),
        bytes,
        sha256,
    })
}

fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

fn derive_hparams(model: &mut Ct2Model) -> Result<Hparams, Error> {
    let dims =
        |m: &Ct2Model, name: &str| -> Result<Vec<usize>, Error> { Ok(m.var(name)?.shape.clone()) };
    let emb = dims(model, "decoder/embeddings/weight")?;
    let enc_pos = dims(model, "encoder/position_encodings/encodings")?;
    let dec_pos = dims(model, "decoder/position_encodings/encodings")?;
    let conv1 = dims(model, "encoder/conv1/weight")?;
    let (n_vocab, n_text_state) = match emb.as_slice() {
        [a, b] => (*a, *b),
        _ => return Err(convert_err(&model.path, "token embedding is not 2-D")),
    };
    let (n_audio_ctx, n_audio_state) = match enc_pos.as_slice() {
        [a, b] => (*a, *b),
        _ => return Err(convert_err(&model.path, "encoder positions are not 2-D")),
    };
    let n_text_ctx = dec_pos.first().copied().unwrap_or(0);
    let n_mels = match conv1.as_slice() {
        [_, mels, 3] => *mels,
        _ => {
            return Err(convert_err(
                &model.path,
                "encoder/conv1/weight is not (state, mels, 3)",
            ));
        }
    };
    if n_audio_state != n_text_state {
        return Err(convert_err(
            &model.path,
            "audio and text widths differ; whisper.cpp needs them equal",
        ));
    }
    let n_audio_head = model.scalar("encoder/num_heads")?;
    let n_text_head = model.scalar("decoder/num_heads")?;
    let h = Hparams {
        n_vocab: n_vocab as i32,
        n_audio_ctx: n_audio_ctx as i32,
        n_audio_state: n_audio_state as i32,
        n_audio_head: n_audio_head as i32,
        n_audio_layer: model.layers("encoder") as i32,
        n_text_ctx: n_text_ctx as i32,
        n_text_state: n_text_state as i32,
        n_text_head: n_text_head as i32,
        n_text_layer: model.layers("decoder") as i32,
        n_mels: n_mels as i32,
        ftype: 1,
    };
    if h.n_audio_layer == 0 || h.n_text_layer == 0 {
        return Err(convert_err(
            &model.path,
            "no encoder or decoder layers found",
        ));
    }
    Ok(h)
}

/// GPT-2's byte ↔ printable-character table: byte `b` is written as
/// character `table[b]`.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

/// The regular tokens of `vocabulary.txt` (those before `<|endoftext|>`),
/// decoded from GPT-2's byte-level characters back to raw bytes.
fn read_vocabulary(path: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let text = std::fs::read_to_string(path).map_err(io_err(path, "read the vocabulary"))?;
    let table = bytes_to_unicode();
    let inverse: HashMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, c)| (*c, b as u8))
        .collect();
    let mut tokens = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line == "<|endoftext|>" {
            return Ok(tokens);
        }
        let bytes = line
            .chars()
            .map(|c| inverse.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| {
                convert_err(
                    path,
                    format!("line {}: {line:?} is not a GPT-2 byte-level token", i + 1),
                )
            })?;
        tokens.push(bytes);
    }
    Err(convert_err(path, "no <|endoftext|> token found"))
}

/// librosa's `filters.mel(sr, n_fft, n_mels)` with its defaults (fmin 0,
/// fmax sr/2, Slaney mel scale, Slaney area normalisation), row-major
/// `n_mels × (n_fft/2 + 1)`, computed in f64 and rounded to f32 exactly like
/// librosa (bit-identical to openai-whisper's `mel_filters.npz`).
pub fn mel_filters(sr: f64, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let n_freqs = n_fft / 2 + 1;
    let fftfreqs: Vec<f64> = (0..n_freqs).map(|k| k as f64 * sr / n_fft as f64).collect();
    let min_mel = hz_to_mel(0.0);
    let max_mel = hz_to_mel(sr / 2.0);
    // numpy.linspace: start + i * step, last point exactly `stop`.
    let n_points = n_mels + 2;
    let step = (max_mel - min_mel) / (n_points - 1) as f64;
    let mel_f: Vec<f64> = (0..n_points)
        .map(|i| {
            if i == n_points - 1 {
                mel_to_hz(max_mel)
            } else {
                mel_to_hz(i as f64 * step + min_mel)
            }
        })
        .collect();
    let fdiff: Vec<f64> = mel_f.windows(2).map(|w| w[1] - w[0]).collect();
    let mut weights = vec![0f32; n_mels * n_freqs];
    for i in 0..n_mels {
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        for (k, f) in fftfreqs.iter().enumerate() {
            let lower = -(mel_f[i] - f) / fdiff[i];
            let upper = (mel_f[i + 2] - f) / fdiff[i + 1];
            // librosa stores the triangle in an f32 array, then scales it
            // in place by the f64 norm: two roundings, reproduced here.
            // np.maximum(0, x) keeps x when x is ±0 (the first filter
            // starts at -0.0), so only negative values become 0.
            let v = lower.min(upper);
            let w = if v < 0.0 { 0.0 } else { v } as f32;
            weights[i * n_freqs + k] = (f64::from(w) * enorm) as f32;
        }
    }
    weights
}

const F_SP: f64 = 200.0 / 3.0;
const MIN_LOG_HZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;

fn logstep() -> f64 {
    6.4f64.ln() / 27.0
}

fn hz_to_mel(f: f64) -> f64 {
    if f >= MIN_LOG_HZ {
        MIN_LOG_MEL + (f / MIN_LOG_HZ).ln() / logstep()
    } else {
        f / F_SP
    }
}

fn mel_to_hz(m: f64) -> f64 {
    if m >= MIN_LOG_MEL {
        MIN_LOG_HZ * (logstep() * (m - MIN_LOG_MEL)).exp()
    } else {
        F_SP * m
    }
}

fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        DType::I8 | DType::I16 | DType::I32 => Vec::new(),
    }
}

/// IEEE half → single (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: shift the mantissa up until its leading 1 is implicit.
            let mut e: u32 = 127 - 15 + 1;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// IEEE single → half, rounding to nearest even (like numpy's `astype`).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let mant = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rounded = (m + half - 1 + ((m >> shift) & 1)) >> shift;
        return sign | rounded as u16;
    }
    let m = mant >> 13;
    let rem = mant & 0x1fff;
    let mut h = ((e as u32) << 10) | m;
    if rem > 0x1000 || (rem == 0x1000 && m & 1 == 1) {
        // A carry into the exponent is the correct rounding too.
        h += 1;
    }
    sign | h as u16
}

/// A buffered writer that hashes what it writes.
struct HashWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    path: PathBuf,
    bytes: u64,
}

impl HashWriter {
    fn new(inner: BufWriter<File>, path: &Path) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            path: path.to_path_buf(),
            bytes: 0,
        }
    }
    fn write(&mut self, b: &[u8]) -> Result<(), Error> {
        self.hasher.update(b);
        self.bytes += b.len() as u64;
        self.inner
            .write_all(b)
            .map_err(io_err(&self.path, "write the converted model"))
    }
    fn i32(&mut self, v: i32) -> Result<(), Error> {
        self.write(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> Result<(), Error> {
        self.write(&v.to_le_bytes())
    }
    fn finish(self) -> Result<(u64, String), Error> {
        let path = self.path.clone();
        let file = self
            .inner
            .into_inner()
            .map_err(|e| io_err(&path, "write the converted model")(e.into_error()))?;
        file.sync_all()
            .map_err(io_err(&path, "write the converted model"))?;
        Ok((self.bytes, hex::encode(self.hasher.finalize())))
    }
}

/// Reads back the header and tensor index of a ggml Whisper file.
pub fn read_ggml_summary(path: &Path) -> Result<GgmlSummary, Error> {
    let f = File::open(path).map_err(io_err(path, "open the ggml model"))?;
    let len = f
        .metadata()
        .map_err(io_err(path, "read the ggml model"))?
        .len();
    let mut r = Reader {
        inner: BufReader::new(f),
        path: path.to_path_buf(),
        pos: 0,
        len,
    };
    let i32_ = |r: &mut Reader| -> Result<i32, Error> { Ok(r.u32()? as i32) };
    let magic = r.u32()?;
    if magic != GGML_MAGIC {
        return Err(convert_err(
            path,
            format!("bad magic {magic:#x}: not a ggml Whisper file"),
        ));
    }
    let mut a = [0i32; 11];
    for v in &mut a {
        *v = i32_(&mut r)?;
    }
    let hparams = Hparams::from_array(a);
    let n_mel = i32_(&mut r)?;
    let n_fft = i32_(&mut r)?;
    r.skip(n_mel.max(0) as u64 * n_fft.max(0) as u64 * 4)?;
    let n_vocab = i32_(&mut r)?.max(0) as usize;
    for _ in 0..n_vocab {
        let l = r.u32()?;
        r.skip(u64::from(l))?;
    }
    let mut tensors = Vec::new();
    while r.pos < r.len {
        let n_dims = i32_(&mut r)?;
        let name_len = i32_(&mut r)?;
        let ttype = i32_(&mut r)?;
        if !(1..=4).contains(&n_dims) || !(0..=1).contains(&ttype) || !(1..=256).contains(&name_len)
        {
            return Err(convert_err(
                path,
                format!("corrupt tensor header at byte {}", r.pos),
            ));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(i32_(&mut r)?);
        }
        let mut name = vec![0u8; name_len as usize];
        for b in &mut name {
            *b = r.u8()?;
        }
        let elems: u64 = dims.iter().map(|d| (*d).max(0) as u64).product();
        r.skip(elems * if ttype == 0 { 4 } else { 2 })?;
        tensors.push((String::from_utf8_lossy(&name).into_owned(), dims, ttype));
    }
    Ok(GgmlSummary {
        hparams,
        mel_filters: (n_mel, n_fft),
        vocab_tokens: n_vocab,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_round_trips_and_rounds_to_even() {
        for h in [
            0u16, 0x3c00, 0xbc00, 0x7bff, 0x0001, 0x03ff, 0x0400, 0x7c00, 0x5640,
        ] {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#x}");
        }
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        // 1 + 2^-11 is halfway between 1 and the next half: ties to even (1).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        // Slightly above the halfway point rounds up.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3c01);
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn mel_filters_match_librosa_bit_for_bit() {
        let f = mel_filters(16_000.0, 400, 80);
        assert_eq!(f.len(), 80 * 201);
        let at = |m: usize, k: usize| f[m * 201 + k];
        // Values of openai-whisper's assets/mel_filters.npz (mel_80), which is
        // librosa.filters.mel(sr=16000, n_fft=400, n_mels=80).
        assert_eq!(at(0, 1), 0.024862595_f32);
        assert_eq!(at(17, 17), 0.019862859_f32);
        assert_eq!(at(46, 54), 0.010863499_f32);
        assert_eq!(at(79, 198), 0.000897518_f32);
        assert_eq!(at(40, 60), 0.0);
        // And all 16,080 of them: sha256 of the array's little-endian bytes.
        let mut h = Sha256::new();
        for x in &f {
            h.update(x.to_le_bytes());
        }
        assert_eq!(
            hex::encode(h.finalize()),
            "4f2701b1d287d74a0dc9871026e9519d98cb76426615f2539b0d151a0ae4ec2e"
        );
    }

    #[test]
    fn names_map_like_whisper_cpp() {
        let one = |n: &str| match map_name(n) {
            Some(Target::One(s)) => s,
            _ => panic!("{n} should map to one tensor"),
        };
        assert_eq!(one("encoder/conv1/weight"), "encoder.conv1.weight");
        assert_eq!(one("encoder/layer_norm/gamma"), "encoder.ln_post.weight");
        assert_eq!(one("decoder/layer_norm/beta"), "decoder.ln.bias");
        assert_eq!(
            one("decoder/position_encodings/encodings"),
            "decoder.positional_embedding"
        );
        assert_eq!(
            one("decoder/layer_3/attention/linear_2/weight"),
            "decoder.blocks.3.cross_attn.out.weight"
        );
        assert_eq!(
            one("encoder/layer_0/ffn/linear_1/bias"),
            "encoder.blocks.0.mlp.2.bias"
        );
        match map_name("encoder/layer_1/self_attention/linear_0/bias") {
            Some(Target::Split(v)) => assert_eq!(
                v,
                vec![
                    Some("encoder.blocks.1.attn.query.bias".to_string()),
                    None,
                    Some("encoder.blocks.1.attn.value.bias".to_string())
                ]
            ),
            _ => panic!("fused qkv"),
        }
        assert!(matches!(map_name("decoder/num_heads"), Some(Target::Skip)));
        assert!(map_name("encoder/layer_0/attention/linear_0/weight").is_none());
    }

    #[test]
    fn tensor_count_for_tiny() {
        let h = Hparams::from_array([51864, 1500, 384, 6, 4, 448, 384, 6, 4, 80, 1]);
        assert_eq!(h.expected_tensors(), 167);
    }

    #[test]
    fn missing_source_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = convert_whisper_ct2(dir.path(), &dir.path().join("out.bin"), &mut |_, _| {})
            .expect_err("empty dir");
        assert!(err.to_string().contains("model.bin"), "{err}");
    }
}
