import os
import warnings

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# cvxpy warns about inaccurate solutions; the tests check accuracy themselves.
warnings.filterwarnings("ignore", message="Solution may be inaccurate")
