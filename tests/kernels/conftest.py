"""Per-class cases for the shared long-conv block tests (tests/kernels/test_base.py)."""


def pytest_generate_tests(metafunc):
    # Each implementation's test class lists the cases it runs (`cases()`), so a kernel with a
    # narrow L range or a slow interpreter runs fewer, never skipped, cases.
    if "case" in metafunc.fixturenames and metafunc.cls is not None:
        cases = metafunc.cls.cases()
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
