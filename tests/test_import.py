"""`tsfa` and `convergence` must import (and solve) with torch and pyomo absent."""

import subprocess
import sys
import textwrap


def test_import_without_torch_and_pyomo():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'pyomo', 'transformers', 'peft', 'flwr'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import tsfa, convergence
        r = tsfa.min_latency_bandwidth([1e6, 2e6], [1e8, 1e7], [0.1, 0.2], 2e7)
        assert r.success, r.message
        for heavy in ('torch', 'pyomo', 'cvxpy'):
            assert heavy not in sys.modules, heavy
        print('ok', r.latency_s)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
