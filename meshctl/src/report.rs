//! A check report: one line per check, `✓` held, `✗` failed (with what to do), `!` worth
//! knowing (with what to do, if anything). Owns only the lines and their printing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Pass,
    Fail,
    Warn,
}

#[derive(Debug, Clone)]
pub struct Line {
    pub mark: Mark,
    pub text: String,
    pub fix: Option<String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    pub fn pass(&mut self, text: impl Into<String>) {
        self.push(Mark::Pass, text.into(), None);
    }

    pub fn fail(&mut self, text: impl Into<String>, fix: impl Into<String>) {
        self.push(Mark::Fail, text.into(), Some(fix.into()));
    }

    pub fn warn(&mut self, text: impl Into<String>, fix: Option<String>) {
        self.push(Mark::Warn, text.into(), fix);
    }

    fn push(&mut self, mark: Mark, text: String, fix: Option<String>) {
        self.lines.push(Line { mark, text, fix });
    }

    pub fn failures(&self) -> usize {
        self.lines.iter().filter(|l| l.mark == Mark::Fail).count()
    }

    /// Prints a section heading and then the lines added since `from`.
    pub fn print_from(&self, from: usize) {
        for l in &self.lines[from.min(self.lines.len())..] {
            let mark = match l.mark {
                Mark::Pass => "✓",
                Mark::Fail => "✗",
                Mark::Warn => "!",
            };
            println!("{mark} {}", l.text);
            if let Some(fix) = &l.fix {
                println!("    → {fix}");
            }
        }
    }
}
