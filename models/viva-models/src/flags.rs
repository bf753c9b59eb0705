//! The workers' command-line flags: `--name VALUE` or `--name=VALUE`, read
//! one at a time (the workers take a handful; no parser crate needed).

/// Flags from an argument list.
pub struct Flags<I> {
    args: I,
    usage: &'static str,
}

impl<I: Iterator<Item = String>> Flags<I> {
    /// `usage` ends the message of a flag that lacks its value.
    pub fn new(args: impl IntoIterator<IntoIter = I>, usage: &'static str) -> Flags<I> {
        Flags {
            args: args.into_iter(),
            usage,
        }
    }

    /// The next argument as it was written, and its value when written
    /// `--name=value`.
    pub fn next_flag(&mut self) -> Option<(String, Option<String>)> {
        let arg = self.args.next()?;
        Some(match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        })
    }

    /// The value of flag `name`: the inline one, else the next argument.
    pub fn value(&mut self, name: &str, inline: Option<String>) -> Result<String, String> {
        inline
            .or_else(|| self.args.next())
            .ok_or_else(|| format!("{name} needs a value; {}", self.usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_inline_or_next_and_a_missing_one_says_the_usage() {
        let args = ["--a=1", "--b", "2", "--c"].map(String::from);
        let mut f = Flags::new(args, "usage: x");
        let (n, i) = f.next_flag().expect("a");
        assert_eq!(f.value(&n, i), Ok("1".to_owned()));
        let (n, i) = f.next_flag().expect("b");
        assert_eq!(f.value(&n, i), Ok("2".to_owned()));
        let (n, i) = f.next_flag().expect("c");
        assert_eq!(
            f.value(&n, i),
            Err("--c needs a value; usage: x".to_owned())
        );
        assert!(f.next_flag().is_none());
    }
}
