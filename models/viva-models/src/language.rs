//! The languages Whisper transcribes, by the codes an assignment stores,
//! and the checks of an assignment's language and vocabulary.
//!
//! An assignment's language is one of [`WHISPER_LANGUAGES`]' codes, or
//! none (detect it from the recording). Its vocabulary (course terms) goes
//! to Whisper as the initial prompt, which biases decoding towards those
//! spellings; Whisper reads at most about 224 prompt tokens, so the
//! vocabulary is bounded by [`MAX_VOCABULARY_CHARS`].

/// Longest vocabulary an assignment may hold, in characters (Whisper keeps
/// the last 224 tokens of a prompt; 600 characters is about 150 tokens of
/// English terms, leaving room for accented or non-Latin ones).
pub const MAX_VOCABULARY_CHARS: usize = 600;

/// Whisper's languages: (code, English name), in Whisper's own order
/// (openai/whisper `tokenizer.LANGUAGES`, as whisper.cpp knows them).
pub const WHISPER_LANGUAGES: &[(&str, &str)] = &[
    ("en", "English"),
    ("zh", "Chinese"),
    ("de", "German"),
    ("es", "Spanish"),
    ("ru", "Russian"),
    ("ko", "Korean"),
    ("fr", "French"),
    ("ja", "Japanese"),
    ("pt", "Portuguese"),
    ("tr", "Turkish"),
    ("pl", "Polish"),
    ("ca", "Catalan"),
    ("nl", "Dutch"),
    ("ar", "Arabic"),
    ("sv", "Swedish"),
    ("it", "Italian"),
    ("id", "Indonesian"),
    ("hi", "Hindi"),
    ("fi", "Finnish"),
    ("vi", "Vietnamese"),
    ("he", "Hebrew"),
    ("uk", "Ukrainian"),
    ("el", "Greek"),
    ("ms", "Malay"),
    ("cs", "Czech"),
    ("ro", "Romanian"),
    ("da", "Danish"),
    ("hu", "Hungarian"),
    ("ta", "Tamil"),
    ("no", "Norwegian"),
    ("th", "Thai"),
    ("ur", "Urdu"),
    ("hr", "Croatian"),
    ("bg", "Bulgarian"),
    ("lt", "Lithuanian"),
    ("la", "Latin"),
    ("mi", "Maori"),
    ("ml", "Malayalam"),
    ("cy", "Welsh"),
    ("sk", "Slovak"),
    ("te", "Telugu"),
    ("fa", "Persian"),
    ("lv", "Latvian"),
    ("bn", "Bengali"),
    ("sr", "Serbian"),
    ("az", "Azerbaijani"),
    ("sl", "Slovenian"),
    ("kn", "Kannada"),
    ("et", "Estonian"),
    ("mk", "Macedonian"),
    ("br", "Breton"),
    ("eu", "Basque"),
    ("is", "Icelandic"),
    ("hy", "Armenian"),
    ("ne", "Nepali"),
    ("mn", "Mongolian"),
    ("bs", "Bosnian"),
    ("kk", "Kazakh"),
    ("sq", "Albanian"),
    ("sw", "Swahili"),
    ("gl", "Galician"),
    ("mr", "Marathi"),
    ("pa", "Punjabi"),
    ("si", "Sinhala"),
    ("km", "Khmer"),
    ("sn", "Shona"),
    ("yo", "Yoruba"),
    ("so", "Somali"),
    ("af", "Afrikaans"),
    ("oc", "Occitan"),
    ("ka", "Georgian"),
    ("be", "Belarusian"),
    ("tg", "Tajik"),
    ("sd", "Sindhi"),
    ("gu", "Gujarati"),
    ("am", "Amharic"),
    ("yi", "Yiddish"),
    ("lo", "Lao"),
    ("uz", "Uzbek"),
    ("fo", "Faroese"),
    ("ht", "Haitian Creole"),
    ("ps", "Pashto"),
    ("tk", "Turkmen"),
    ("nn", "Nynorsk"),
    ("mt", "Maltese"),
    ("sa", "Sanskrit"),
    ("lb", "Luxembourgish"),
    ("my", "Myanmar"),
    ("bo", "Tibetan"),
    ("tl", "Tagalog"),
    ("mg", "Malagasy"),
    ("as", "Assamese"),
    ("tt", "Tatar"),
    ("haw", "Hawaiian"),
    ("ln", "Lingala"),
    ("ha", "Hausa"),
    ("ba", "Bashkir"),
    ("jw", "Javanese"),
    ("su", "Sundanese"),
    ("yue", "Cantonese"),
];

/// The English name of a Whisper language code ("fr" → "French").
pub fn language_name(code: &str) -> Option<&'static str> {
    WHISPER_LANGUAGES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, n)| *n)
}

/// The assignment's language as stored: `None` for "detect it" (absent,
/// empty or `"auto"`), else a lower-cased Whisper code. The error says what
/// to use instead.
pub fn normalise_language(value: Option<&str>) -> Result<Option<String>, String> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let v = v.to_ascii_lowercase();
    if v == "auto" {
        return Ok(None);
    }
    // A BCP 47 tag such as "fr-CA" names the language Whisper knows as "fr".
    let primary = v.split(['-', '_']).next().unwrap_or(&v);
    if language_name(primary).is_some() {
        Ok(Some(primary.to_owned()))
    } else {
        Err(format!(
            "language {v:?} is not one Whisper transcribes: use \"auto\" (detect it) or a code \
             such as \"en\", \"fr\", \"de\", \"es\""
        ))
    }
}

/// The vocabulary as stored: `None` when empty; whitespace collapsed;
/// refused when longer than [`MAX_VOCABULARY_CHARS`] or holding control
/// characters.
pub fn normalise_vocabulary(value: Option<&str>) -> Result<Option<String>, String> {
    let Some(v) = value else { return Ok(None) };
    if v.chars().any(|c| c.is_control() && !c.is_whitespace()) {
        return Err("vocabulary must be plain text (no control characters)".into());
    }
    let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
    if v.is_empty() {
        return Ok(None);
    }
    let n = v.chars().count();
    if n > MAX_VOCABULARY_CHARS {
        return Err(format!(
            "vocabulary is {n} characters; at most {MAX_VOCABULARY_CHARS} reach Whisper (it reads \
             only the last ~224 tokens of a prompt): keep the course terms students are likely \
             to say and that are easy to misspell"
        ));
    }
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_are_codes_or_detection() {
        assert_eq!(normalise_language(None), Ok(None));
        assert_eq!(normalise_language(Some(" ")), Ok(None));
        assert_eq!(normalise_language(Some("auto")), Ok(None));
        assert_eq!(normalise_language(Some("fr")), Ok(Some("fr".into())));
        assert_eq!(normalise_language(Some("FR-ca")), Ok(Some("fr".into())));
        assert_eq!(normalise_language(Some("yue")), Ok(Some("yue".into())));
        let e = normalise_language(Some("klingon")).expect_err("unknown");
        assert!(e.contains("\"auto\""), "{e}");
        assert_eq!(language_name("fr"), Some("French"));
        assert_eq!(language_name("ht"), Some("Haitian Creole"));
        assert_eq!(WHISPER_LANGUAGES.len(), 100);
    }

    #[test]
    fn vocabulary_is_bounded_plain_text() {
        assert_eq!(normalise_vocabulary(Some("  ")), Ok(None));
        assert_eq!(
            normalise_vocabulary(Some("photosynthèse,\n chlorophylle")),
            Ok(Some("photosynthèse, chlorophylle".into()))
        );
        assert!(normalise_vocabulary(Some("a\u{7}b")).is_err());
        let long = "x".repeat(MAX_VOCABULARY_CHARS + 1);
        assert!(normalise_vocabulary(Some(&long)).is_err());
    }
}
