%% @doc Supervises one megaphone_sidecar session per attached sidecar.
%% Sessions are temporary: a sidecar that goes away re-attaches with a new
%% hello, it is never restarted from this side.
-module(megaphone_sidecar_sup).
-behaviour(supervisor).

-export([start_link/0, start_session/3, sessions/0]).
-export([init/1]).

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Starts the session for a sidecar that said hello.
-spec start_session(pid(), pos_integer(), map()) -> {ok, pid()} | {error, term()}.
start_session(Sidecar, Version, Info) ->
    supervisor:start_child(?MODULE, [Sidecar, Version, Info]).

%% @doc The live session processes.
-spec sessions() -> [pid()].
sessions() ->
    [Pid || {_, Pid, _, _} <- supervisor:which_children(?MODULE), is_pid(Pid)].

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    Session = #{id => megaphone_sidecar,
                start => {megaphone_sidecar, start_link, []},
                restart => temporary,
                shutdown => 5000},
    {ok, {#{strategy => simple_one_for_one, intensity => 100, period => 10}, [Session]}}.
