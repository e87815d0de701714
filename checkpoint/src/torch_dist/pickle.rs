//! A restricted pickle reader: it builds a tree of values and never executes anything.
//!
//! Python's unpickler imports and calls whatever a pickle names; this one only records what a
//! pickle *would* build. `GLOBAL`/`STACK_GLOBAL` yield a [`Value::Global`] after checking the
//! name against the caller's allowlist (any other name is an error naming it); `REDUCE`,
//! `NEWOBJ` and `BUILD` yield a [`Value::Object`] holding the callable, its arguments and its
//! state; persistent ids (`BINPERSID`, how `torch.save` refers to storages) yield
//! [`Value::PersId`]. The callers (`dcp`, `archive`) interpret those trees.
//!
//! Memory is bounded by the input: every opcode reads its arguments from the input (lengths are
//! checked against what is left before anything is allocated), the memo is a map (a huge index
//! allocates nothing), and values are shared (`Rc`), never copied, so memo references cannot
//! blow up. Protocols 2–5 binary opcodes are read; the text opcodes of protocol 0/1 that build
//! objects (`INST`, `OBJ`), extension codes and out-of-band buffers are refused.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A value a pickle builds.
#[derive(Clone, Debug)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer that fits `i64` (larger ones are refused).
    Int(i64),
    /// A float.
    Float(f64),
    /// A str.
    Str(Rc<str>),
    /// bytes / bytearray / a protocol-2 binary string.
    Bytes(Rc<[u8]>),
    /// A tuple.
    Tuple(Rc<[Value]>),
    /// A list (shared: `APPEND` on a memoized list is seen through every reference).
    List(Rc<RefCell<Vec<Value>>>),
    /// A dict or `collections.OrderedDict`, in insertion order.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A set or frozenset.
    Set(Rc<RefCell<Vec<Value>>>),
    /// An allowlisted global, `module.name`, not imported.
    Global(Rc<Global>),
    /// What `callable(*args)` (REDUCE, NEWOBJ) would build, plus any BUILD state.
    Object(Rc<RefCell<Object>>),
    /// A persistent id (`torch.save`'s storage references).
    PersId(Rc<Value>),
}

/// A global name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    /// Module, e.g. `torch.distributed.checkpoint.metadata`.
    pub module: String,
    /// Name, e.g. `Metadata`.
    pub name: String,
}

/// An object the pickle would build: `class(*args)` then `__setstate__(state)`.
#[derive(Clone, Debug)]
pub struct Object {
    /// The callable (an allowlisted global).
    pub class: Rc<Global>,
    /// Its arguments.
    pub args: Vec<Value>,
    /// The `BUILD` state, if any.
    pub state: Option<Value>,
}

/// Why a pickle could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickleError {
    /// A global outside the allowlist.
    Disallowed {
        /// `module.name`.
        global: String,
    },
    /// Malformed or unsupported input at a byte position.
    Malformed {
        /// Byte position of the opcode.
        pos: usize,
        /// What is wrong.
        msg: String,
    },
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickleError::Disallowed { global } => {
                write!(f, "pickle names global {global}, which is not in the allowlist (nothing is executed)")
            }
            PickleError::Malformed { pos, msg } => write!(f, "pickle byte {pos}: {msg}"),
        }
    }
}

/// Nesting depth allowed when a caller walks a value (cycles through shared lists/dicts are
/// possible in a hostile pickle).
pub const MAX_DEPTH: usize = 64;

enum Slot {
    Mark,
    V(Value),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u64, Value>,
    allowed: &'a dyn Fn(&str, &str) -> bool,
}

/// Reads one pickle, allowing only the globals for which `allowed(module, name)` is true.
pub fn load(data: &[u8], allowed: &dyn Fn(&str, &str) -> bool) -> Result<Value, PickleError> {
    let mut m = Machine { data, pos: 0, op_pos: 0, stack: Vec::new(), memo: HashMap::new(), allowed };
    m.run()
}

impl<'a> Machine<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError::Malformed { pos: self.op_pos, msg: msg.into() })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        if n > self.data.len() - self.pos {
            return self.err(format!("needs {n} bytes, {} left (truncated)", self.data.len() - self.pos));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len_u32(&mut self) -> Result<usize, PickleError> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }

    fn len_u64(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.le()?);
        usize::try_from(n).or_else(|_| self.err(format!("length {n} too large")))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("unterminated text argument");
        };
        let s = std::str::from_utf8(&rest[..n]).or_else(|_| self.err("text argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::V(v));
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        match self.stack.pop() {
            Some(Slot::V(v)) => Ok(v),
            Some(Slot::Mark) => self.err("unexpected MARK on the stack"),
            None => self.err("stack underflow"),
        }
    }

    fn top(&mut self) -> Result<Value, PickleError> {
        match self.stack.last() {
            Some(Slot::V(v)) => Ok(v.clone()),
            _ => self.err("no value on the stack"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(m) = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)) else {
            return self.err("no MARK on the stack");
        };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|s| match s {
                Slot::V(v) => v,
                Slot::Mark => unreachable!("the last MARK was at m"),
            })
            .collect())
    }

    fn string(&self, b: &[u8]) -> Result<Value, PickleError> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("str is not UTF-8"),
        }
    }

    fn global(&self, module: &str, name: &str) -> Result<Value, PickleError> {
        if !(self.allowed)(module, name) {
            return Err(PickleError::Disallowed { global: format!("{module}.{name}") });
        }
        Ok(Value::Global(Rc::new(Global { module: module.to_string(), name: name.to_string() })))
    }

    fn memo_put(&mut self, idx: u64) -> Result<(), PickleError> {
        let v = self.top()?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<(), PickleError> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.push(v);
                Ok(())
            }
            None => self.err(format!("memo index {idx} was never stored")),
        }
    }

    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.err("odd number of items for a dict");
        }
        let Value::Dict(d) = target else {
            return self.err("SETITEM(S) on a value that is not a dict");
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn call(&mut self, callable: Value, args: Vec<Value>) -> Result<Value, PickleError> {
        let Value::Global(class) = callable else {
            return self.err("REDUCE/NEWOBJ of a value that is not a global");
        };
        // `collections.OrderedDict()` is a dict; SETITEMS then fills it.
        if class.module == "collections" && class.name == "OrderedDict" && args.is_empty() {
            return Ok(Value::Dict(Rc::default()));
        }
        Ok(Value::Object(Rc::new(RefCell::new(Object { class, args, state: None }))))
    }

    fn tuple_items(&self, v: Value) -> Result<Vec<Value>, PickleError> {
        match v {
            Value::Tuple(t) => Ok(t.to_vec()),
            _ => self.err("arguments are not a tuple"),
        }
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            self.op_pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().map(|_| ()).map_or_else(|| self.err("POP on an empty stack"), Ok)?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()));
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement.
                    let n = if op == 0x8a { self.u8()? as usize } else { self.len_u32()? };
                    let b = self.take(n)?;
                    if n > 8 {
                        return self.err(format!("integer of {n} bytes does not fit i64"));
                    }
                    let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                    a[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(a)));
                }
                b'I' => {
                    // INT (text; protocol 0/1 and `I01`/`I00` bools).
                    let s = self.line()?;
                    let v = match s {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(s.parse().or_else(|_| self.err(format!("bad INT {s:?}")))?),
                    };
                    self.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v = self.string(b)?;
                    self.push(v);
                }
                b'X' | 0x8d => {
                    let n = if op == b'X' { self.len_u32()? } else { self.len_u64()? };
                    let b = self.take(n)?;
                    let v = self.string(b)?;
                    self.push(v);
                }
                b'C' | b'U' => {
                    // SHORT_BINBYTES / SHORT_BINSTRING
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(b)));
                }
                b'B' | b'T' | 0x8e | 0x96 => {
                    // BINBYTES / BINSTRING / BINBYTES8 / BYTEARRAY8
                    let n = if matches!(op, b'B' | b'T') { self.len_u32()? } else { self.len_u64()? };
                    let b = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(b)));
                }
                b')' => self.push(Value::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::from(items)));
                }
                b']' => self.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        _ => return self.err("APPEND(S) on a value that is not a list"),
                    }
                }
                b'}' => self.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::default());
                    self.set_items(&d, items)?;
                    self.push(d);
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    let target = self.top()?;
                    self.set_items(&target, items)?;
                }
                0x8f => self.push(Value::Set(Rc::default())),
                0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::Set(s) => s.borrow_mut().extend(items),
                        _ => return self.err("ADDITEMS on a value that is not a set"),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::Set(Rc::new(RefCell::new(items))));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return self.err("STACK_GLOBAL needs two str");
                    };
                    let g = self.global(&module, &name)?;
                    self.push(g);
                }
                b'R' => {
                    let args = self.pop()?;
                    let args = self.tuple_items(args)?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let args = self.pop()?;
                    let args = self.tuple_items(args)?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.push(v);
                }
                0x92 => {
                    // NEWOBJ_EX: kwargs are kept as a trailing argument.
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let mut args = self.tuple_items(args)?;
                    args.push(kwargs);
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Object(o) => {
                            let mut o = o.borrow_mut();
                            if o.state.is_some() {
                                return self.err("BUILD twice on one object");
                            }
                            o.state = Some(state);
                        }
                        Value::Dict(d) => {
                            // BUILD on a dict subclass with a dict state updates its items.
                            let Value::Dict(s) = state else {
                                return self.err("BUILD on a dict with a state that is not a dict");
                            };
                            if Rc::ptr_eq(&d, &s) {
                                return self.err("BUILD of a dict with itself");
                            }
                            d.borrow_mut().extend(s.borrow().iter().cloned());
                        }
                        _ => return self.err("BUILD on a value that is not an object"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Value::PersId(Rc::new(pid)));
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(i.into())?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.le()?);
                    self.memo_put(i.into())?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let s = self.line()?;
                    let i = s.parse().or_else(|_| self.err(format!("bad PUT index {s:?}")))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(i.into())?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.le()?);
                    self.memo_get(i.into())?;
                }
                b'g' => {
                    let s = self.line()?;
                    let i = s.parse().or_else(|_| self.err(format!("bad GET index {s:?}")))?;
                    self.memo_get(i)?;
                }
                other => {
                    return self.err(format!(
                        "unsupported opcode 0x{other:02x} (only the data opcodes of protocols 2-5 are read)"
                    ));
                }
            }
        }
    }
}

impl Value {
    /// The str, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The int, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// True for a global `module.name`.
    pub fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Value::Global(g) if g.module == module && g.name == name)
    }

    /// A short description for error messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(x) => format!("float {x}"),
            Value::Str(s) => format!("str {:?}", truncate(s)),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(t) => format!("tuple of {}", t.len()),
            Value::List(l) => format!("list of {}", l.borrow().len()),
            Value::Dict(d) => format!("dict of {}", d.borrow().len()),
            Value::Set(s) => format!("set of {}", s.borrow().len()),
            Value::Global(g) => format!("global {}.{}", g.module, g.name),
            Value::Object(o) => format!("{}.{} object", o.borrow().class.module, o.borrow().class.name),
            Value::PersId(_) => "persistent id".into(),
        }
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &str, _: &str) -> bool {
        true
    }

    #[test]
    fn reads_a_dict_of_tuples() {
        // pickle.dumps({'a': (1, 300, -2)}, protocol=2)
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01M,\x01J\xfe\xff\xff\xff\x87q\x02s.";
        let v = load(p, &any).unwrap();
        let Value::Dict(d) = v else { panic!("{v:?}") };
        let d = d.borrow();
        assert_eq!(d[0].0.as_str(), Some("a"));
        let Value::Tuple(t) = &d[0].1 else { panic!() };
        assert_eq!(t.iter().map(|x| x.as_int().unwrap()).collect::<Vec<_>>(), vec![1, 300, -2]);
    }

    #[test]
    fn refuses_a_global_outside_the_allowlist() {
        // The classic exploit shape: os.system('echo') via GLOBAL + REDUCE. Nothing runs; the
        // name is reported.
        let p = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03.";
        let e = load(p, &|m, _| m == "torch").unwrap_err();
        assert_eq!(e, PickleError::Disallowed { global: "os.system".into() });
    }

    #[test]
    fn huge_lengths_and_memo_indices_allocate_nothing() {
        // BINUNICODE8 claiming 2^60 bytes, then LONG_BINGET of an unknown index.
        let mut p = vec![0x80, 4, 0x8d];
        p.extend((1u64 << 60).to_le_bytes());
        assert!(matches!(load(&p, &any), Err(PickleError::Malformed { .. })));
        let p = b"\x80\x02j\xff\xff\xff\xff.";
        assert!(matches!(load(p, &any), Err(PickleError::Malformed { .. })));
    }

    #[test]
    fn truncation_at_every_byte_is_an_error() {
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01M,\x01J\xfe\xff\xff\xff\x87q\x02s.";
        for n in 0..p.len() {
            assert!(load(&p[..n], &any).is_err(), "prefix of {n} bytes");
        }
    }
}
