"""What a fake node session needs besides its own `call`: the typed calls of
labvm/remote/recipes.py, alone (`run`) or in one round trip (`call_many`), answered by `call`."""


class TypedCalls:
    def run(self, call, check=False):
        return self.call(call.helper, call.action, call.params, timeout=call.timeout, **({"check": True} if check else {}))["data"]

    def call_many(self, calls, done=lambda _index: None, check=False):
        replies = []
        for index, call in enumerate(calls):
            replies.append(self.call(call.helper, call.action, call.params, timeout=call.timeout,
                                     **({"check": True} if check else {})))
            done(index)
        return replies

    def alive(self, timeout):
        pass

    def close(self):
        pass
