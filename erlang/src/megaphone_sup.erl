%% @doc Top supervisor: the listener that takes sidecars' hellos, and the
%% supervisor of one session process per attached sidecar.
-module(megaphone_sup).
-behaviour(supervisor).

-export([start_link/0]).
-export([init/1]).

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% Sessions start before the listener, so the listener can always
    %% place a new session.
    Children = [#{id => megaphone_sidecar_sup,
                  start => {megaphone_sidecar_sup, start_link, []},
                  type => supervisor},
                #{id => megaphone_listener,
                  start => {megaphone_listener, start_link, []}}],
    {ok, {#{strategy => rest_for_one, intensity => 10, period => 10}, Children}}.
