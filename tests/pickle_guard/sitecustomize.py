"""A tripwire for tests: every Python process started with this directory on PYTHONPATH (the ranks of
a test server) records any unpickling and any open() of a pickle-format checkpoint.

Armed only when SHARDLINE_PICKLE_GUARD_DIR is set: it writes `armed-<pid>` there at start-up (so a test
can prove the guard ran in every rank) and appends a stack to `violations.log` on:
  - pickle.load / pickle.loads / pickle.Unpickler (mpi4py's lower-case send/recv/bcast... go through
    pickle.loads), patched before anything imports them;
  - torch.load (its weights-only unpickler is pure Python and raises no audit event), wrapped as soon
    as torch.serialization has run, before torch/__init__ copies it to torch.load;
  - the audit event pickle.find_class (any unpickler that resolves a global, the C one included);
  - the audit event open for a *.bin / *.pt / *.pth / *.pkl / *.pickle / *.ckpt file.
It never changes behaviour: the original function still runs, so the server under test is unchanged.
"""
import os
import sys

_DIR = os.environ.get("SHARDLINE_PICKLE_GUARD_DIR")
_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

if _DIR:
    import pickle

    _busy = [False]

    def _record(what: str) -> None:
        if _busy[0]:
            return
        _busy[0] = True
        try:
            import traceback
            stack = "".join(traceback.format_stack(limit=12)[:-2])
            rank = os.environ.get("OMPI_COMM_WORLD_RANK", "?")
            with open(os.path.join(_DIR, "violations.log"), "a") as f:
                f.write(f"--- pid {os.getpid()} rank {rank}: {what}\n{stack}")
        finally:
            _busy[0] = False

    _loads, _load, _Unpickler = pickle.loads, pickle.load, pickle.Unpickler

    def loads(*args, **kwargs):
        _record("pickle.loads")
        return _loads(*args, **kwargs)

    def load(*args, **kwargs):
        _record("pickle.load")
        return _load(*args, **kwargs)

    class Unpickler(_Unpickler):
        def __init__(self, *args, **kwargs):
            _record("pickle.Unpickler")
            super().__init__(*args, **kwargs)

    pickle.loads, pickle.load, pickle.Unpickler = loads, load, Unpickler

    class _TorchLoadFinder:
        """Wraps torch.serialization.load right after that module runs."""

        def find_spec(self, name, path=None, target=None):
            if name != "torch.serialization":
                return None
            import importlib.machinery
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                original = module.load

                def guarded_load(*args, **kwargs):
                    _record("torch.load")
                    return original(*args, **kwargs)
                module.load = guarded_load
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _TorchLoadFinder())

    def _audit(event, args):
        if event == "pickle.find_class":
            _record(f"pickle.find_class {args[0]}.{args[1]}")
        elif event == "open" and args and isinstance(args[0], (str, bytes)):
            name = os.fsdecode(args[0])
            if name.endswith(_SUFFIXES):
                _record(f"open {name}")

    sys.addaudithook(_audit)
    with open(os.path.join(_DIR, f"armed-{os.getpid()}"), "w") as f:
        f.write(" ".join(sys.argv))
