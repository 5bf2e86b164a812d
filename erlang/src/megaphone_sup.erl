%% @doc Top supervisor: the listener that takes sidecars' hellos, the
%% supervisor of one session process per attached sidecar, and the
%% supervisor of the sidecars run as ports.
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
                  start => {megaphone_listener, start_link, []}},
                %% Last, so that its troubles restart nothing else.
                #{id => megaphone_port_sup,
                  start => {megaphone_port_sup, start_link, []},
                  type => supervisor}],
    {ok, {#{strategy => rest_for_one, intensity => 10, period => 10}, Children}}.
