//! A set of allowed system calls, some only with given arguments, and its translation into a
//! seccomp BPF program. Sets are built per thread kind (`kinds`) and joined for the spawner,
//! whose children inherit its filter.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::Error;

/// When a system call is allowed.
#[derive(Debug, Clone, PartialEq)]
enum When {
    /// Whatever its arguments.
    Always,
    /// When one of these rules (each a conjunction of argument tests) matches.
    Matching(Vec<SeccompRule>),
}

/// One argument test, the piece a rule is made of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// Argument `index` (32 bits) equals the value.
    Is(u8, u64),
    /// Argument `index` (32 bits) masked with `mask` equals the value.
    Masked(u8, u64, u64),
}

impl Arg {
    fn condition(self) -> Result<SeccompCondition, Error> {
        let (index, op, value) = match self {
            Arg::Is(index, value) => (index, SeccompCmpOp::Eq, value),
            Arg::Masked(index, mask, value) => (index, SeccompCmpOp::MaskedEq(mask), value),
        };
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(Error::Rule)
    }
}

/// System calls allowed, each always or under rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allowed {
    calls: BTreeMap<i64, When>,
}

impl Allowed {
    /// Allows each of `calls` whatever its arguments.
    pub(crate) fn always(mut self, calls: &[libc::c_long]) -> Self {
        for &call in calls {
            self.calls.insert(call, When::Always);
        }
        self
    }

    /// Allows `call` when all of `args` hold; several `when`s for one call are alternatives.
    pub(crate) fn when(mut self, call: libc::c_long, args: &[Arg]) -> Result<Self, Error> {
        let conditions = args
            .iter()
            .map(|arg| arg.condition())
            .collect::<Result<Vec<_>, _>>()?;
        let rule = SeccompRule::new(conditions).map_err(Error::Rule)?;
        match self.calls.entry(call).or_insert(When::Matching(Vec::new())) {
            When::Always => {}
            When::Matching(rules) => rules.push(rule),
        }
        Ok(self)
    }

    /// Allows `ioctl` on any descriptor with each of these request numbers.
    pub(crate) fn ioctls(self, requests: &[u64]) -> Result<Self, Error> {
        requests.iter().try_fold(self, |allowed, &request| {
            allowed.when(libc::SYS_ioctl, &[Arg::Is(1, request)])
        })
    }

    /// What either set allows.
    pub(crate) fn union(mut self, other: &Allowed) -> Self {
        for (&call, when) in &other.calls {
            match (self.calls.get_mut(&call), when) {
                (None, _) => {
                    self.calls.insert(call, when.clone());
                }
                (Some(mine), When::Always) => *mine = When::Always,
                (Some(When::Always), When::Matching(_)) => {}
                (Some(When::Matching(mine)), When::Matching(theirs)) => {
                    mine.extend(theirs.iter().cloned())
                }
            }
        }
        self
    }

    /// Whether `call` is allowed for some arguments.
    pub fn mentions(&self, call: libc::c_long) -> bool {
        self.calls.contains_key(&call)
    }

    /// Whether `call` is allowed whatever its arguments.
    pub fn allows_always(&self, call: libc::c_long) -> bool {
        self.calls.get(&call) == Some(&When::Always)
    }

    /// The system calls named, in number order.
    pub fn calls(&self) -> impl Iterator<Item = libc::c_long> + '_ {
        self.calls.keys().copied()
    }

    /// The BPF program that allows this set and takes `otherwise` for anything else.
    pub(crate) fn program(&self, otherwise: SeccompAction) -> Result<BpfProgram, Error> {
        let rules = self
            .calls
            .iter()
            .map(|(&call, when)| {
                let rules = match when {
                    When::Always => Vec::new(),
                    When::Matching(rules) => rules.clone(),
                };
                (call, rules)
            })
            .collect();
        let filter = SeccompFilter::new(rules, otherwise, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(Error::Rule)?;
        filter.try_into().map_err(Error::Compile)
    }
}
