//! (Stub; see /work/helpers/s5/design.md.)
