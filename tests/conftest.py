import pytest


@pytest.fixture(params=None)
def isa(request):
    """Run a kernel test under every instruction-set variant this machine supports."""
    from pi_backend import native

    before = native.info()["isa"]
    native.set_isa(request.param)
    yield request.param
    native.set_isa(before)


def pytest_generate_tests(metafunc):
    if "isa" in metafunc.fixturenames:
        from pi_backend import native

        metafunc.parametrize("isa", native.available_isas(), indirect=True)
