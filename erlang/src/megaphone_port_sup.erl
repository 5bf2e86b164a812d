%% @doc Supervises the sidecars the shim runs as ports (megaphone_port),
%% one child per sidecar binary path. A sidecar that exits is started
%% again (after megaphone_port's start delay); one that keeps exiting
%% exhausts this supervisor's intensity and is given up, without touching
%% the rest of the shim.
-module(megaphone_port_sup).
-behaviour(supervisor).

-export([start_link/0, start_port/2, stop_port/1, ports/0]).
-export([init/1]).

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Runs the sidecar at Path with Args (its flags) as a port.
-spec start_port(file:filename_all(), [string()]) -> {ok, pid()} | {error, term()}.
start_port(Path, Args) ->
    supervisor:start_child(?MODULE, #{id => Path,
                                      start => {megaphone_port, start_link, [Path, Args]},
                                      restart => permanent,
                                      shutdown => 5000}).

%% @doc Stops the port sidecar started from Path.
-spec stop_port(file:filename_all()) -> ok | {error, not_found}.
stop_port(Path) ->
    case supervisor:terminate_child(?MODULE, Path) of
        ok -> supervisor:delete_child(?MODULE, Path);
        {error, _} -> {error, not_found}
    end.

%% @doc The port sidecars: path and carrier process.
-spec ports() -> [{file:filename_all(), pid() | restarting | undefined}].
ports() ->
    [{Id, Pid} || {Id, Pid, _, _} <- supervisor:which_children(?MODULE)].

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    {ok, {#{strategy => one_for_one, intensity => 10, period => 60}, []}}.
